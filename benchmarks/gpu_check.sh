#!/usr/bin/env bash
# One call on the GPU machine: build the kernels, run the GPU tests, run both benchmarks.
# Usage (repo root, results under $OUT):  bash benchmarks/gpu_check.sh
# Budget: 10 minutes in all; each step has its own timeout so a hang cannot eat the rest,
# and a failed step does not stop the later ones (the summary lists every exit code).
set -u
OUT=${OUT:-/tmp/qtool_gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_MODULE_LOADING=LAZY
declare -A RC

step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T), limit ${secs}s): $*" | tee -a "$OUT/summary.txt"
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  RC[$name]=$?
  echo "=== $name rc=${RC[$name]}" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
}

{ nvidia-smi; nvcc --version; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  >"$OUT/env.txt" 2>&1
for mod in pytest tabulate; do  # no internet there: say up front if a step will fail for a missing module
  $PY -c "import $mod" 2>/dev/null || echo "WARNING: python module $mod missing; steps needing it will fail" | tee -a "$OUT/env.txt"
done
cat "$OUT/env.txt"

# 1. Build for the local GPU only (sm_90 on H100/H200; sm_80 is covered by CPU CI).
ARCH=$($PY -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")
step build 120 $PY -m quant.kernels.build --arch "$ARCH" --jobs 16
cp build/qtool_kernels/*.log "$OUT/" 2>/dev/null

# 2. Tests: CPU kernel tests (cheap) and the GPU sweep, stop at the first failure of a file.
step test_cpu 45 $PY -m pytest tests/test_kernels_cpu.py -q -x -p no:cacheprovider
step test_gpu 170 $PY -m pytest tests/test_kernels_gpu.py -q -x -p no:cacheprovider -rs

# 3. Benchmarks (tables appended to $OUT/RESULTS_gpu.md).
step bench_gemm_fp16 120 $PY benchmarks/bench_gemm.py --dtype fp16 --group-size 128 --out "$OUT/RESULTS_gpu.md"
step bench_gemm_bf16 45 $PY benchmarks/bench_gemm.py --dtype bf16 --group-size 128 --m 1 16 256 1024 \
  --shapes 4096x4096 4096x14336 8192x28672 --out "$OUT/RESULTS_gpu.md"
step bench_decode 80 $PY benchmarks/bench_decode.py --batch 1 8 32 --steps 64 --out "$OUT/RESULTS_gpu.md"

echo "=== summary" | tee -a "$OUT/summary.txt"
for k in build test_cpu test_gpu bench_gemm_fp16 bench_gemm_bf16 bench_decode; do
  echo "$k rc=${RC[$k]:-not run}" | tee -a "$OUT/summary.txt"
done
