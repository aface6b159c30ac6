#!/usr/bin/env bash
# GPU check of the embed job's fast path: so400m-patch14-384's geometry with random weights (the model hub is not
# needed) on one H100/H200, no network, under 9 minutes:
#   step 1  the model alone, bfloat16 and float16, batch 64 / 128 / 256, eager; the Parquet writer alone;
#   step 2  decode + preprocess on one core (ours vs SiglipImageProcessor; nvjpeg vs CPU pixels), the model alone
#           compiled (torch.compile) at batch 256 in bfloat16, then the embed job (bfloat16, compiled, batch 256,
#           16 workers) on 10,000 generated 500x375 JPEGs (quality 90), decoding in the workers and, second, on
#           the GPU with nvjpeg; each next to its data path alone;
#   step 3  the model alone compiled at batch 256 in float16;
#   step 4  SigLIP 2 NaFlex: so400m-patch16-naflex's geometry (random weights, 256 patches of 500x375 images), the
#           model alone in bfloat16 at batch 64 / 256, eager;
#   step 5  (more than one GPU) the embed job with device=auto, every GPU, against cuda:0 alone, as a ratio.
# Each step runs under a `timeout` (120 + 240 + 90 + 90 s, step 5 240 s): one cut short keeps the figures it had
# written.
# Each step prints its report (images/s, TFLOP/s, MFU against the card's dense bf16 peak, FLOPs counted from the
# model) and writes JSON; the figures and logs go to $OUT (else outputs/gpu-check). docs/perf.md explains them.
#
# Prepare, on a machine with PyPI, in the repository root: the GPU image has torch, torchvision, transformers,
# pyarrow, pandas, scikit-learn, tqdm and PyYAML, but not Hydra, whose pure-Python wheels travel in .whl/
# (antlr4-python3-runtime 4.9.3 is published as a source archive only; `pip wheel` builds its wheel):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip wheel --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
# Run, on the GPU machine, from a copy of the repository with .whl/ in it (the sources run from the tree through
# PYTHONPATH=., nothing is installed but the wheels, into /tmp/site):
#   bash scripts/gpu_check.sh
# Check the script itself on a machine without a GPU: the same steps, small, with the tiny model on CPU (~3 min):
#   PYTHON=.venv/bin/python bash scripts/gpu_check.sh --cpu
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
if [ "${1:-}" = "--cpu" ]; then mode=cpu; fi
py=${PYTHON:-python3}
out=${OUT:-outputs/gpu-check}
work=${WORK_DIR:-/tmp/gpu-check}
mkdir -p "$out" "$work"

if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
elif ! "$py" -c "import hydra" 2>/dev/null; then
  echo "error: hydra-core is not installed and there is no .whl/ folder (see this script's header)" >&2
  exit 2
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ "$mode" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  # 16 workers x 2 batches in flight x 256 images x 442 KB: the DataLoader needs ~3.6 GB of /dev/shm
  echo "cores: $(nproc), /dev/shm: $(df -h /dev/shm | tail -1 | awk '{print $2}')"
  common=(model=so400m_random device=cuda "work_dir=$work")
  step1=("sweep.dtypes=[bfloat16,float16]" "sweep.batch_sizes=[64,128,256]" "sweep.compile=[false]"
         sweep.warmup=3 sweep.iters=10 sweep.repeats=3 writer.rows=100000 writer.batch_size=256)
  step2=(preprocess.images=100 preprocess.rounds=3
         "sweep.dtypes=[bfloat16]" "sweep.batch_sizes=[256]" "sweep.compile=[true]"
         sweep.warmup=3 sweep.iters=10 sweep.repeats=3
         embed.dtype=bfloat16 embed.batch_size=256 embed.compile=true embed.images=10000 embed.num_workers=16
         "embed.device_decode=[false,true]" embed.rounds=1)
  step3=("sweep.dtypes=[float16]" "sweep.batch_sizes=[256]" "sweep.compile=[true]"
         sweep.warmup=3 sweep.iters=10 sweep.repeats=3)
  step4=(model=so400m_naflex_random device=cuda "work_dir=$work" "sweep.dtypes=[bfloat16]" "sweep.batch_sizes=[64,256]"
         "sweep.compile=[false]" sweep.warmup=3 sweep.iters=10 sweep.repeats=3)
  limits=(120 240 90 90)
else
  common=(model=tiny device=cpu "work_dir=$work")
  step1=("sweep.dtypes=[float32,bfloat16]" "sweep.batch_sizes=[8,16]" "sweep.compile=[false]"
         sweep.warmup=1 sweep.iters=2 sweep.repeats=1 writer.rows=2000)
  step2=(preprocess.images=16 preprocess.rounds=1
         "sweep.dtypes=[float32]" "sweep.batch_sizes=[16]" "sweep.compile=[true]"
         sweep.warmup=2 sweep.iters=2 sweep.repeats=1
         embed.dtype=float32 embed.batch_size=16 embed.compile=true embed.images=96 embed.num_workers=1
         "embed.device_decode=[false,true]" embed.rounds=1)
  step3=("sweep.dtypes=[bfloat16]" "sweep.batch_sizes=[16]" "sweep.compile=[true]"
         sweep.warmup=2 sweep.iters=2 sweep.repeats=1)
  step4=(model=so400m_naflex_random device=cpu "work_dir=$work" "sweep.dtypes=[float32]" "sweep.batch_sizes=[2]"
         "sweep.compile=[false]" sweep.warmup=1 sweep.iters=1 sweep.repeats=1)
  limits=(120 240 150 120)
fi

"$py" -c "import hydra, torch, torchvision, transformers; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'transformers', transformers.__version__, 'hydra', hydra.__version__, 'from', hydra.__file__,
'cuda', torch.cuda.is_available())"

status=0
echo "== step 1: the model alone, eager; the Parquet writer"
timeout "${limits[0]}" "$py" -m pipelines.bench "${common[@]}" "parts=[model,writer]" "${step1[@]}" \
  "output=$out/step1-eager.json" 2>&1 | tee "$out/step1-eager.log" || status=1
echo "== step 2: preprocessing, the model alone compiled, the embed job"
timeout "${limits[1]}" "$py" -m pipelines.bench "${common[@]}" "parts=[preprocess,model,embed]" "${step2[@]}" \
  "output=$out/step2-compiled.json" 2>&1 | tee "$out/step2-compiled.log" || status=1
echo "== step 3: the model alone compiled, the second dtype"
timeout "${limits[2]}" "$py" -m pipelines.bench "${common[@]}" "parts=[model]" "${step3[@]}" \
  "output=$out/step3-compiled.json" 2>&1 | tee "$out/step3-compiled.log" || status=1
echo "== step 4: SigLIP 2 NaFlex, the model alone (so400m-patch16-naflex geometry)"
timeout "${limits[3]}" "$py" -m pipelines.bench "${step4[@]}" "parts=[model]" \
  "output=$out/step4-naflex.json" 2>&1 | tee "$out/step4-naflex.log" || status=1
if [ "$mode" = gpu ]; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  one=(--one cuda:0 --all auto --model so400m-random --images 8000 --batch-size 256)
else
  gpus=2  # the same step on two CPU encoder processes
  one=(--one cpu --all "[cpu,cpu]" --model tiny --images 200 --batch-size 16)
fi
if [ "${gpus:-0}" -gt 1 ]; then
  echo "== step 5: the embed job on every device (device=auto) against one, as a ratio"
  timeout 240 "$py" -m pipelines.bench.devices "${one[@]}" --dir "$work/devices" 2>&1 | tee "$out/step5-devices.log" \
    || status=1
fi
echo "== figures in $out: step1-eager.json, step2-compiled.json, step3-compiled.json, step4-naflex.json (and logs);" \
  "exit status $status"
exit $status
