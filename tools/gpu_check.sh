#!/usr/bin/env bash
# The GPU checks of issue 9 in one call (the device tool runs this in the repo root; $OUT comes back):
# the speed benchmark with a profile, the CUDA test lane, bf16-vs-fp32 training with real FID on the
# bundled emoji, and FID precision/time on a trained checkpoint.
# Needs the real FID-Inception weights as .device/pt_inception-2015-12-05-fp16.pth (measuring only).
set -u
export PYTHONUNBUFFERED=1 TORCH_HOME=/tmp/torch_home
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; R=/tmp/run; mkdir -p $R
log() { echo "=== $(date +%T) $*"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python -c "import torch,sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"; } 2>&1 | tee $OUT/env.txt
python -c "import torch,os; d=os.environ['TORCH_HOME']+'/hub/checkpoints'; os.makedirs(d,exist_ok=True); sd=torch.load('.device/pt_inception-2015-12-05-fp16.pth'); torch.save({k:v.float() for k,v in sd.items()}, d+'/pt_inception-2015-12-05-6726825d.pth')"
W=$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth

STAGES=${STAGES:-bench,lane,quality,diag,fid}
export PYTHONFAULTHANDLER=1  # a run stopped by `timeout -s ABRT` prints every thread's stack
if [[ $STAGES == *bench* ]]; then
  log bench
  timeout ${BENCH_T:-240} python bench.py --profile 20 --fid_weights $W --out $R/bench.json ${BENCH_ARGS:-} 2>&1 | tee $R/bench.txt
fi
if [[ $STAGES == *quality* ]]; then  # in the background, beside the test lane (timings not used)
  log quality start
  for amp in bf16 none; do for s in 0 3; do
    timeout -s ABRT ${QUALITY_T:-240} python main.py --imsize 64 --span $s --amp $amp --compile none --total_step ${Q_STEPS:-3000} \
      --fid_step ${Q_FID_STEP:-1000} --fid_samples 5000 --seed 0 --version q_${amp}_s$s --log_step 100 --sample_step 1000 --num_workers 0 \
      --log_path $R/logs --model_save_path $R/models --sample_path $R/samples --attn_path $R/attn > $R/q_${amp}_s$s.log 2>&1 &
  done; done
fi
if [[ $STAGES == *diag* ]]; then  # FID during training with the default 2 loader workers
  log diag start
  timeout -s ABRT ${DIAG_T:-60} python main.py --imsize 32 --total_step 300 --fid_step 150 --fid_samples 1000 --seed 0 \
    --version diag --log_path $R/dlogs --model_save_path $R/dmodels --sample_path $R/dsamples --attn_path $R/dattn > $R/diag.log 2>&1 &
fi
if [[ $STAGES == *lane* ]]; then
  log lane
  timeout ${LANE_T:-300} python -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider --durations=15 ${LANE_ARGS:-} 2>&1 | tee $R/lane.txt | tail -40
fi
wait
if [[ $STAGES == *quality* ]]; then
  log quality done
  for f in $R/q_*.log; do echo "--- $f"; grep -E "^step (1000|2000|3000|4000)[:/ ]|FID|error|Error" $f | tail -6; done
  tail -n 4 $R/logs/q_*/fid.csv
fi
if [[ $STAGES == *diag* ]]; then log diag; tail -n 40 $R/diag.log; fi
if [[ $STAGES == *fid* ]]; then
  CK=$(ls $R/models/q_bf16_s3/*.pt 2>/dev/null | sort -V | tail -1)
  for p in fp32 tf32; do
    log "fid.py $p on $CK"
    /usr/bin/time -f "%e s wall" timeout 120 python fid.py $CK data/emoji64.npz --fid_samples 10000 --batch_size 500 \
      --fid_precision $p --fid_weights $W --no_progress 2>&1 | tail -3
  done
fi
tar czf $OUT/results.tgz -C $R . 2>/dev/null
log end
