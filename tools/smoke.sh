#!/usr/bin/env bash
# The README's runtime commands, tiny, as a user runs them: `tools/smoke.sh PYTHON FOLDER`.
# .ci/run calls it in a virtual environment holding requirements.txt only, so an import
# that requirements.txt does not bring fails here, before any test dependency is installed.
# FID uses random weights in the real layout (the real ones cannot be downloaded here).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$1"; mkdir -p "$2"; cd "$2"
export OMP_NUM_THREADS=1
tiny=(--imsize 32 --batch_size 8 --num_workers 0 --g_conv_dim 16 --d_conv_dim 16 --z_dim 32 --seed 0
      --log_step 2 --sample_step 4 --model_save_step 4)
"$py" -c "import sys, torch; sys.path.insert(0, sys.argv[1]); import inception; torch.save(inception.FIDInception().state_dict(), 'w.pth')" "$repo"
fid=(--fid_step 2 --fid_samples 8 --fid_ref_samples 16 --fid_batch_size 8 --fid_weights w.pth)
set -x
"$py" "$repo/main.py" --help > /dev/null
"$py" "$repo/fid.py" --help > /dev/null
"$py" "$repo/fid.py" compare --help > /dev/null
"$py" "$repo/bench.py" --help > /dev/null
"$py" "$repo/main.py" "${tiny[@]}" --total_step 4 --span 2 --version smoke
"$py" "$repo/main.py" "${tiny[@]}" --total_step 6 --span 2 --version smoke --resume
"$py" "$repo/main.py" --version smoke --train false --n_samples 8 --device cpu
"$py" "$repo/main.py" --config logs/smoke/config.json --total_step 2 --version smoke_config --use_tensorboard
"$py" "$repo/main.py" "${tiny[@]}" "${fid[@]}" --total_step 2 --span 0,3 --seed 0,1 --version sweep
"$py" "$repo/fid.py" compare logs/sweep_span0_seed0 logs/sweep_span0_seed1 logs/sweep_span3_seed0 \
    logs/sweep_span3_seed1 --csv compare.csv --out compare.png --html report.html
"$py" "$repo/fid.py" samples/smoke/eval_6 logs/fid_stats/*.npz --fid_weights w.pth
"$py" "$repo/fid.py" samples/smoke/eval_6 logs/fid_stats/*.npz --fid_weights w.pth --json > fid.json
"$py" -c "import json, sys; sys.path.insert(0, sys.argv[1]); import api
assert api.metrics('samples/smoke/eval_6', sys.argv[2], fid_weights='w.pth') == json.load(open('fid.json'))" \
    "$repo" logs/fid_stats/*.npz
"$py" "$repo/fid.py" models/smoke/6.pt samples/smoke/eval_6 --fid_samples 8 --fid_weights w.pth
"$py" "$repo/bench.py" --device cpu --steps 2 --out bench.json
test -f models/smoke/6.pt && test "$(ls samples/smoke/eval_6 | wc -l)" = 8 && test -s compare.csv
test -f models/smoke_config/2.pt
# both pages (the sweep's own and --html's) hold each of the 4 cells' sample grid and attention picture
for page in logs/sweep_sweep_report.html report.html; do
    test "$(grep -o 'class="sample" src="data:image/png' "$page" | wc -l)" = 4
    test "$(grep -o 'class="attention" src="data:image/png' "$page" | wc -l)" = 4
done
