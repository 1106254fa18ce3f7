#!/usr/bin/env bash
# One device call: install the checkout, run the GPU tests, then the named benchmarks; logs go to $OUT.
#   bash benchmarks/gpu.sh tests                      # kernel + CUDA greedy tests
#   bash benchmarks/gpu.sh bench --P 512 2048 --T 8   # benchmarks/tree_attention.py with these arguments
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" | tee -a "$OUT/device.txt"
case "${1:-tests}" in
  tests) python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_tree_attention.py tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" ;;
  bench) shift; python3 benchmarks/tree_attention.py --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log" ;;
  *) shift; "$@" 2>&1 | tee "$OUT/cmd.log" ;;
esac
