#!/usr/bin/env bash
# The GPU checks of issues 9 and 25 in one call of at most 8 minutes on one H100. The device tool
# runs it in the repository root and brings back what lands in $OUT (summary.txt, results.tgz):
#
#   bash tools/gpu_check.sh                  # on the device; needs the real FID-Inception weights as
#                                            # .device/pt_inception-2015-12-05-fp16.pth (carried)
#   DRY_RUN=1 bash tools/gpu_check.sh        # here, on the CPU: every phase at tiny sizes with random
#                                            # FID weights, one after another (2 to 7 minutes on 2
#                                            # cores, as busy as they are), so a typo costs no GPU time
#   PHASES=resume,fid bash tools/gpu_check.sh     # some phases only (names below); KEEP_WORK=1 keeps
#                                            # the work folder; every size and timeout: see the top
#
# Phases, in this order (each with its own timeout; a run stopped by its timeout gets SIGABRT first,
# so Python's faulthandler prints every thread's stack: a stall shows where it waits):
#   bench      alone (its timings are reported): bench.py, defaults vs reference, spans 0 and 3,
#              --profile (GPU busy ms and kernels per step), FID of 10k samples in both precisions
#   then at once (no timing of theirs is reported; they share the GPU):
#   lane       pytest -m cuda tests/test_cuda.py
#   cache      --cache false with the default CUDA graph: loader workers + pin-memory thread at capture
#   workers    FID during training with 2 loader workers, twice: the command that stalled 220 s
#              (bundled emoji, defaults) and image files with --cache false (persistent workers,
#              the FID reference read by workers); each must end well inside its timeout
#   resume     N steps straight vs N/2 + --resume, graph and plain, in separate processes: every
#              tensor of the two final checkpoints compared bit for bit (tools/gpu_check.py same);
#              the dry run has no graph and runs plain only
#   precision  --amp bf16 vs --amp none (fp32 with TF32), spans 0 and 3, 3 seeds each, on the bundled
#              emoji at 64², --compile none, FID of 5,000 samples (real weights) at 1,000 and 2,000
#              steps; then `fid.py compare --csv` over the 12 runs (the dry run: span 3, one seed)
#   fid        alone: fid.py on a trained checkpoint, 10,000 samples, wall time as a user sees it
#   summary    tools/gpu_check.py summary: one table of phases, the lane's failures, resume, bench,
#              the precision comparison (Welch's t-test per span); printed and in $OUT/summary.txt
# Budget on one H100 (estimated from the README's measurements; not run yet): setup ~10 s, bench
# <= 175 s (~165 expected: two torch.compile warm-ups of ~40 s dominate), the group <= 215 s (12
# runs x 2,000 steps at ~4-6 ms of GPU each and 24 FIDs, ~190 s; the lane and the checks beside
# them), fid <= 35 s, summary ~10 s; with 5 s for each timeout's kill: <= 465 s. A phase cut by its
# timeout loses only itself: bench's rows are read from its log, and the comparison takes the last
# FID step every seed reached (1,000 if 2,000 was not).
# Every size and timeout below can be overridden from the environment (e.g. Q_STEPS=3000 T_Q=300).
# Comes back in $OUT: summary.txt, env.txt, bench.json, precision.csv, results.tgz (every log).
# Exit code: 0 when every phase exited 0.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
DRY=${DRY_RUN:-0}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
PHASES=${PHASES:-bench,lane,cache,workers,resume,precision,fid}
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 TORCH_HOME=$WORK/torch_home
log() { echo "=== $(date +%T) $*"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
has() { [[ ",$PHASES," == *",$1,"* ]]; }
PY=${PYTHON:-python}

if [[ $DRY == 1 ]]; then
  MODE="dry run, CPU"
  DEV=(--device cpu)
  GRAPH=false                  # the CPU has no graph: the dry run checks the commands, not the capture
  TINY=(--imsize 32 --batch_size 8 --g_conv_dim 16 --d_conv_dim 16 --z_dim 32 --fid_batch_size 16
        --fid_ref_samples 32)
  N_IMAGES=${N_IMAGES:-24}
  BENCH_ARGS=(--device cpu --spans 3 --steps 2 --warmup 1 --profile 2 --fid_samples 8 --fid_batch_size 8)
  CACHE_STEPS=${CACHE_STEPS:-4} W_STEPS=${W_STEPS:-2} W_FID_STEP=${W_FID_STEP:-2} W_FID_SAMPLES=${W_FID_SAMPLES:-8}
  RESUME_STEPS=${RESUME_STEPS:-4} RESUME_MODES=${RESUME_MODES:-plain}  # on the CPU graph = plain
  Q_SIZE=(--imsize 32 --batch_size 8 --g_conv_dim 16 --d_conv_dim 16 --z_dim 32 --fid_batch_size 16
          --fid_ref_samples 16)
  Q_STEPS=${Q_STEPS:-2} Q_FID_STEP=${Q_FID_STEP:-2} Q_FID_SAMPLES=${Q_FID_SAMPLES:-8} SEEDS=${SEEDS:-0} SPANS=${SPANS:-3}
  FID_ARGS=(--fid_samples 8 --batch_size 8 --device cpu)
  FID_REAL=$WORK/data/small.npz
  T_BENCH=${T_BENCH:-300} T_LANE=${T_LANE:-120} T_CHECK=${T_CHECK:-180} T_Q=${T_Q:-180} T_FID=${T_FID:-120}
  T_PRECISION=${T_PRECISION:-900}
  BG=0                         # two cores: the group's phases and the precision cells one after another
else
  MODE="device"
  DEV=()
  GRAPH=true
  TINY=()
  N_IMAGES=${N_IMAGES:-1432}
  BENCH_ARGS=(--profile 20 --n_images 2048)  # else bench.py's GPU defaults: batch 64, 64², 300 steps after 30, FID of 10k
  CACHE_STEPS=${CACHE_STEPS:-200} W_STEPS=${W_STEPS:-300} W_FID_STEP=${W_FID_STEP:-150} W_FID_SAMPLES=${W_FID_SAMPLES:-1000}
  RESUME_STEPS=${RESUME_STEPS:-40} RESUME_MODES=${RESUME_MODES:-"graph plain"}
  Q_SIZE=(--imsize 64)
  Q_STEPS=${Q_STEPS:-2000} Q_FID_STEP=${Q_FID_STEP:-1000} Q_FID_SAMPLES=${Q_FID_SAMPLES:-5000} SEEDS=${SEEDS:-"0 1 2"} SPANS=${SPANS:-"0 3"}
  FID_ARGS=(--fid_samples 10000 --batch_size 500)
  FID_REAL=data/emoji64.npz
  T_BENCH=${T_BENCH:-175} T_LANE=${T_LANE:-210} T_CHECK=${T_CHECK:-150} T_Q=${T_Q:-195} T_FID=${T_FID:-35}
  T_PRECISION=$((T_Q + 20))   # the cells run at once, each under T_Q; then the comparison
  BG=1                         # the group's phases and the precision cells at once, sharing the GPU
fi
echo "$MODE" > "$WORK/mode.txt"
export WORK PY GRAPH BG
# in the background on the device, one after another in the dry run
maybe_bg() { if [[ $BG == 1 ]]; then "$@" & else "$@"; fi; }

# ---------------------------------------------------------------- setup
log "setup ($MODE) in $WORK"
{ if [[ $DRY != 1 ]]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
  $PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (with changes)')"
} > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt"
W=$WORK/fid_weights.pth
if ! has bench && ! has workers && ! has precision && ! has fid; then
  :  # no phase measures FID: no weights needed
elif [[ $DRY == 1 ]]; then
  $PY tools/gpu_check.py weights "$W" --random
else
  SRC=.device/pt_inception-2015-12-05-fp16.pth
  if [[ ! -f $SRC ]]; then echo "no $SRC: carry the real FID weights (see the header)"; exit 2; fi
  $PY tools/gpu_check.py weights "$W" --from "$SRC"
fi
$PY tools/gpu_check.py data "$WORK/data" "$N_IMAGES"
# every run writes under $WORK (its own output roots), never into the checkout
outs() { echo --log_path "$WORK/$1/logs" --model_save_path "$WORK/$1/models" --sample_path "$WORK/$1/samples" \
              --attn_path "$WORK/$1/attn"; }

# run_phase NAME TIMEOUT NOTE CMD...: CMD under its timeout, output in $WORK/NAME.log, one status line
run_phase() {
  local name=$1 limit=$2 note=$3 t0=$EPOCHREALTIME rc; shift 3
  timeout -k 5 -s ABRT "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(since "$t0")" "$limit" "$note" >> "$WORK/status.tsv"
  log "$name: exit $rc after $(since "$t0") s"
}

# resume_chain MODE: N steps straight, N/2 then --resume to N, checkpoints compared
resume_chain() {
  local mode=$1 half=$((RESUME_STEPS / 2)) graph
  graph=$([[ $mode == graph ]] && echo "$GRAPH" || echo false)
  local args=("${DEV[@]}" "${TINY[@]}" --compile none --num_workers 0 --seed 0 --span 3 --fid_step 0
              --cuda_graph "$graph" --model_save_step "$half" --log_step 2 --sample_step 1000000
              --image_path "$WORK/data" $(outs "resume_$mode"))
  $PY main.py "${args[@]}" --version straight --total_step "$RESUME_STEPS" &&
  $PY main.py "${args[@]}" --version resumed --total_step "$half" &&
  $PY main.py "${args[@]}" --version resumed --total_step "$RESUME_STEPS" --resume &&
  $PY tools/gpu_check.py same "$WORK/resume_$mode/models/straight/$RESUME_STEPS.pt" \
      "$WORK/resume_$mode/models/resumed/$RESUME_STEPS.pt"
}

# precision_runs: every cell under its own timeout (at once on the device), then fid.py compare
precision_runs() {
  local amp span seed pid n=0 ok=0 pids=()
  cell() {
    timeout -k 5 -s ABRT "$T_Q" $PY main.py "${DEV[@]}" "${Q_SIZE[@]}" --span "$2" --amp "$1" --compile none \
      --seed "$3" --total_step "$Q_STEPS" --fid_step "$Q_FID_STEP" --fid_samples "$Q_FID_SAMPLES" \
      --fid_weights "$W" --num_workers 0 --log_step 100 --sample_step "$Q_STEPS" --model_save_step "$Q_STEPS" \
      --image_path "$WORK/data" --version "p_$1_s$2_seed$3" $(outs precision) > "$WORK/precision_$1_s$2_seed$3.log" 2>&1
  }
  for amp in bf16 none; do for span in $SPANS; do for seed in $SEEDS; do
    n=$((n + 1))
    if [[ $BG == 1 ]]; then cell $amp $span $seed & pids+=($!); else cell $amp $span $seed && ok=$((ok + 1)); fi
  done; done; done
  for pid in "${pids[@]}"; do wait "$pid" && ok=$((ok + 1)); done
  echo "$ok of $n runs finished"
  $PY fid.py compare "$WORK"/precision/logs/p_* --csv "$WORK/precision.csv" --out "$WORK/precision.png" \
    > "$WORK/precision.txt" 2>&1
  cat "$WORK/precision.txt"
  [[ $ok == "$n" ]]
}

# ---------------------------------------------------------------- bench, alone
if has bench; then
  log "bench"
  run_phase bench "$T_BENCH" "timings reported" $PY bench.py "${BENCH_ARGS[@]}" --fid_weights "$W" --out "$WORK/bench.json"
fi

# ---------------------------------------------------------------- the concurrent group
log "the group (at once on the device, one after another in the dry run)"
if has lane; then
  if [[ $DRY == 1 ]]; then  # no GPU: the lane's tests are deselected; collecting them imports the file
    run_phase lane "$T_LANE" "collected only (no GPU)" bash -c \
      "$PY -m pytest -p no:cacheprovider --collect-only -q tests/test_cuda.py; test \$? -le 5"
  else
    maybe_bg run_phase lane "$T_LANE" "pytest -m cuda" $PY -m pytest -v -rfE -p no:cacheprovider -m cuda --durations=10 \
      tests/test_cuda.py
  fi
fi
if has cache; then
  maybe_bg run_phase cache "$T_CHECK" "--cache false, --cuda_graph $GRAPH, 2 workers" $PY main.py "${DEV[@]}" "${TINY[@]}" \
    --dataset folder --image_path "$WORK/data/imgs" --cache false --num_workers 2 --cuda_graph "$GRAPH" --compile none \
    --total_step "$CACHE_STEPS" --fid_step 0 --log_step 10 --seed 0 --version cache $(outs cache)
fi
if has workers; then
  maybe_bg run_phase workers_emoji "$T_CHECK" "emoji, defaults, 2 workers, FID" $PY main.py "${DEV[@]}" "${TINY[@]}" \
    --imsize 32 --image_path "$WORK/data" --num_workers 2 --total_step "$W_STEPS" --fid_step "$W_FID_STEP" \
    --fid_samples "$W_FID_SAMPLES" --fid_weights "$W" --seed 0 --version diag $(outs workers_emoji)
  maybe_bg run_phase workers_folder "$T_CHECK" "files, --cache false, 2 workers, FID" $PY main.py "${DEV[@]}" "${TINY[@]}" \
    --dataset folder --image_path "$WORK/data/imgs" --cache false --num_workers 2 --compile none \
    --total_step "$W_STEPS" --fid_step "$W_FID_STEP" --fid_samples "$W_FID_SAMPLES" --fid_weights "$W" --seed 0 \
    --version diag $(outs workers_folder)
fi
export -f resume_chain outs
export RESUME_STEPS
export DEV_S="${DEV[*]}" TINY_S="${TINY[*]}"
if has resume; then
  for mode in $RESUME_MODES; do
    maybe_bg run_phase "resume_$mode" "$T_CHECK" "$RESUME_STEPS steps vs $((RESUME_STEPS / 2)) + resume, cuda_graph $([[ $mode == graph ]] && echo "$GRAPH" || echo false)" \
      bash -c "DEV=(\$DEV_S); TINY=(\$TINY_S); resume_chain $mode"
  done
fi
if has precision; then
  export -f precision_runs
  export W SEEDS SPANS T_Q Q_STEPS Q_FID_STEP Q_FID_SAMPLES Q_SIZE_S="${Q_SIZE[*]}"
  maybe_bg run_phase precision "$T_PRECISION" "seeds $SEEDS x spans $SPANS x bf16/fp32, $Q_STEPS steps" \
    bash -c "DEV=(\$DEV_S); Q_SIZE=(\$Q_SIZE_S); precision_runs"
fi
wait
log "group done"

# ---------------------------------------------------------------- FID of 10k samples, alone
if has fid; then
  CK=$(ls "$WORK"/precision/models/p_bf16_s3_seed0/*.pt "$WORK"/resume_*/models/straight/*.pt 2>/dev/null | head -1)
  if [[ -z $CK ]]; then
    $PY main.py "${DEV[@]}" "${TINY[@]}" --compile none --num_workers 0 --total_step 2 --fid_step 0 --seed 0 \
      --image_path "$WORK/data" --version fidck $(outs fidck) > "$WORK/fidck.log" 2>&1
    CK=$WORK/fidck/models/fidck/2.pt
  fi
  log "fid on $CK"
  t0=$EPOCHREALTIME
  run_phase fid "$T_FID" "fid.py, ${FID_ARGS[1]} samples" $PY fid.py "$CK" "$FID_REAL" "${FID_ARGS[@]}" \
    --fid_weights "$W" --no_progress
  echo "fid.py, ${FID_ARGS[1]} samples of a trained checkpoint: $(since "$t0") s wall (process start included):" \
    "$(tail -n 1 "$WORK/fid.log")" > "$WORK/fid_time.txt"
fi

# ---------------------------------------------------------------- summary, and what comes back
$PY tools/gpu_check.py summary "$WORK" > "$WORK/summary.txt" 2>&1
cp "$WORK/summary.txt" "$WORK/env.txt" "$OUT/"
[[ -f $WORK/bench.json ]] && cp "$WORK/bench.json" "$OUT/"
[[ -f $WORK/precision.csv ]] && cp "$WORK/precision.csv" "$OUT/"
# the details in one archive: logs, fid.csv/metrics.csv/config.json of every run, the comparison's plots
# (no checkpoints, sample pictures or 32 MB statistics files: what comes back is at most 16 MB a file)
tar czf "$OUT/results.tgz" -C "$WORK" --exclude='*.pt' --exclude=torch_home --exclude=data --exclude=samples \
    --exclude=attn --exclude=fid_stats --exclude=fid_weights.pth . 2>/dev/null
cat "$WORK/summary.txt"
log "end; details in $OUT/results.tgz"
bad=$(awk -F'\t' '$2 != 0' "$WORK/status.tsv" 2>/dev/null | wc -l)
[[ ${KEEP_WORK:-0} == 1 ]] || rm -rf "$WORK"
exit $((bad > 0))
