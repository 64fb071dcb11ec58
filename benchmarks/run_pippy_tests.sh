#!/usr/bin/env bash
# Run PiPPy's own test files, unchanged, against this pippy on CPU/gloo; one line per file (rc and last line).
#
#   git -C PiPPy archive HEAD test | tar -x -C /tmp/pu      # PiPPy's test/ folder (not shipped here)
#   bash benchmarks/run_pippy_tests.sh [/tmp/pu] [test_fwd test_grad ...]
#
# Multi-process files run under torchrun (4 processes; test_cpu_init: 2, its default world size);
# test_pipeline_schedule_e2e with --device cpu; the MultiProcessTestCase files and test_ir under
# pytest; the rest as scripts (their __main__ runs the test). Logs go to <dir>/logs.
set -u
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-/tmp/pu}"
shift || true
cd "$DIR" || { echo "no PiPPy test folder at $DIR"; exit 2; }
mkdir -p logs
export PYTHONPATH="$REPO"
PY="$REPO/.venv/bin/python"
TR="$REPO/.venv/bin/torchrun"
DIST="test_autosplit test_bwd test_cpu_init test_fwd test_grad test_interleave test_optim test_skip_conn test_composability"
PYT="test_pipeline_schedule test_pipeline_stage test_ir"
names="$*"
[ -z "$names" ] && names=$(ls test/test_*.py | xargs -n1 basename | sed 's/.py$//')
for n in $names; do
  port=$((29500 + RANDOM % 400))
  if [ "$n" = test_pipeline_schedule_e2e ]; then
    timeout 400 "$TR" --nproc-per-node 2 --master-port $port "test/$n.py" --device cpu --profiler "" \
      --schedules gpipe 1f1b looped_bfs interleaved_1f1b -l INFO > "logs/$n.log" 2>&1
  elif [[ " $DIST " == *" $n "* ]]; then
    np=4; [ "$n" = test_cpu_init ] && np=2
    timeout 300 "$TR" --nproc-per-node $np --master-port $port "test/$n.py" > "logs/$n.log" 2>&1
  elif [[ " $PYT " == *" $n "* ]]; then
    timeout 400 "$PY" -m pytest -q "test/$n.py" > "logs/$n.log" 2>&1
  else
    timeout 300 "$PY" "test/$n.py" > "logs/$n.log" 2>&1
  fi
  rc=$?
  echo "$n rc=$rc $(tail -1 "logs/$n.log" | cut -c1-150)"
done
