#!/usr/bin/env bash
# One script for a machine with a CUDA device: transparency of every schedule on the device, a real
# multi-rank run, and pippy vs torch.distributed.pipelining on GPT-2 (step time, tokens/s, peak memory,
# host syncs, send/compute overlap). See benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh          # CUDA: GPT-2 12x1024, seq 1024 (env LAYERS WIDTH SEQ BATCH STEPS override)
#   PYTHON=/path/to/cuda-venv/bin/python benchmarks/gpu_check.sh   # the default .venv may hold a CPU-only torch
#   benchmarks/gpu_check.sh --cpu    # the same checks, small, on CPU with gloo (make test runs this)
#
# Backends: NCCL on CUDA, one rank per GPU. NCCL refuses two ranks on one GPU, and gloo cannot send
# CUDA tensors point to point, so with one GPU the multi-rank run is skipped (said below) and the
# benchmark runs one rank holding 2 stages (interleaved 1F1B on both sides); the transparency check
# still runs every schedule with several stages in one process on the device.
# Host syncs per step: the CUDA runtime's synchronize calls in one profiled step, each sync once, the
# harness's own torch.cuda.synchronize left out (on CPU: scalar reads); see count_syncs in gpu_check.py.
# PIPPY_TIMEOUT defaults to half the section limit, so a hang ends in pippy's diagnostic first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LIMIT=${SECTION_TIMEOUT:-300}  # seconds per section: a hang (e.g. an NCCL wait) fails that section, not the session
# pippy's own wait limit under the section's: a hang ends in pippy's diagnostic (who waits for what), not a bare kill
export PIPPY_TIMEOUT=${PIPPY_TIMEOUT:-$((LIMIT / 2 > 0 ? LIMIT / 2 : 1))}
run() { timeout "$LIMIT" "$PY" -m torch.distributed.run --standalone --nproc-per-node "$1" benchmarks/gpu_check.py "${@:2}"; }
FAILED=()
section() {  # section NAME COMMAND...: run it; a failure is reported at the end, and the later sections still run
  local name=$1; shift
  if "$@"; then :; else echo "$name: FAILED (exit $?)"; FAILED+=("$name"); fi
}

if [[ "${1:-}" == "--cpu" ]]; then
  DEV=cpu; N=2
  SIZE=(--layers 2 --width 64 --seq 32 --batch 8 --steps 3)
else
  DEV=cuda
  if ! TORCH=$("$PY" -c "import torch; print(torch.__version__, torch.version.cuda)" 2>&1); then
    echo "gpu_check: cannot import torch with PYTHON=$PY: ${TORCH##*$'\n'}. Point PYTHON= at a Python with a CUDA" \
         "build of torch, e.g. PYTHON=/path/to/cuda-venv/bin/python benchmarks/gpu_check.sh"
    exit 2
  fi
  if [[ "${TORCH##* }" == "None" ]]; then  # torch.version.cuda is None: a CPU-only build
    echo "gpu_check: $PY has a CPU-only torch (${TORCH% *}, torch.version.cuda is None), so it sees no GPU." \
         "Point PYTHON= at a Python whose torch is built with CUDA, e.g. PYTHON=/path/to/cuda-venv/bin/python" \
         "benchmarks/gpu_check.sh (in that venv: pip install torch transformers, and pippy's own dependencies)," \
         "or run with --cpu for the CPU mode"
    exit 2
  fi
  N=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  if [[ "$N" -lt 1 ]]; then echo "gpu_check: no CUDA device (run with --cpu for the CPU mode)"; exit 2; fi
  SIZE=(--layers "${LAYERS:-12}" --width "${WIDTH:-1024}" --seq "${SEQ:-1024}" --batch "${BATCH:-8}"
        --steps "${STEPS:-10}")
  "$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), 'torch', torch.__version__)"
fi

echo "== transparency ($DEV, in one process)"
section transparency timeout "$LIMIT" "$PY" benchmarks/gpu_check.py transparency --device "$DEV"
echo "== dist ($DEV, $N ranks)"
if [[ "$N" -ge 2 ]]; then
  section dist run "$N" dist --device "$DEV"
else
  echo "dist: skipped: one GPU (NCCL refuses two ranks on one device; gloo sends no CUDA tensors)"
fi
echo "== bench ($DEV, $N rank(s))"
section bench run "$N" bench --device "$DEV" "${SIZE[@]}"
if [[ ${#FAILED[@]} -gt 0 ]]; then echo "gpu_check: FAILED: ${FAILED[*]}"; exit 1; fi
echo "gpu_check: done"
