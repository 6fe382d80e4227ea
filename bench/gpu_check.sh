#!/usr/bin/env bash
# One GPU check on a bare H100/H200 machine, in under six minutes: install the carried wheels, build
# medvl._C with CUDA for this GPU, run every op test on it, the op benchmarks and the training
# benchmark, and refresh the measured backend order. The machine brings torch, triton, nvcc, cmake,
# ninja, pybind11, scikit-build-core and pytest-xdist; `make gpu-wheels` (on a development machine)
# puts the rest in .whl/. Every step has its own time limit and log; a failed step does not stop the
# next. Logs and results go to $OUT (the device tool's folder) or bench/results/gpu-check/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-bench/results/gpu-check}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
begin=$(date +%s)

# The whole check stays within GPU_CHECK_SECONDS (default 340): a short GPU rental holds its start,
# one check and a rerun. A step gets its own limit or what is left, whichever is less.
DEADLINE=$(( begin + ${GPU_CHECK_SECONDS:-340} ))

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0 left
  t0=$(date +%s)
  left=$(( DEADLINE - t0 ))
  if (( left < 5 )); then
    echo "$name: skipped, the check's time is spent" | tee -a "$SUMMARY"
    return 0
  fi
  (( limit > left )) && limit=$left
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc, $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$SUMMARY"
  tail -n 3 "$OUT_DIR/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
  return 0
}

if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device visible to torch: make gpu-check runs on a GPU machine" >&2
  exit 1
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/medvl-site .whl/*.whl
  export PYTHONPATH="/tmp/medvl-site${PYTHONPATH:+:$PYTHONPATH}"
fi
ARCH=$("$PY" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}{minor}' + ('a' if major >= 9 else ''))")
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, sys.version.split()[0])" >> "$SUMMARY"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$SUMMARY" 2>&1

MEDVL_CUDA=ON MEDVL_CUDA_ARCHS="$ARCH" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  step build 240 "$PY" -m pip install --no-build-isolation --no-deps -e .
step info 60 "$PY" -m medvl info
step gpu-tests 240 "$PY" -m pytest tests/ops tests/kernels -q -n 8 -p no:cacheprovider
step bench 300 "$PY" -m medvl bench --save "$OUT_DIR/$GPU.json"
step backend-order 60 "$PY" bench/backend_order.py "$OUT_DIR/$GPU.json" --table medvl/ops/backend_order.json
cp medvl/ops/backend_order.json "$OUT_DIR/backend_order.json"
step bench-train 300 "$PY" -m pytest bench/bench_train.py -k cuda -q -p no:cacheprovider --benchmark-only \
  --benchmark-json "$OUT_DIR/$GPU-train.json"
echo "total: $(( $(date +%s) - begin )) s" | tee -a "$SUMMARY"
