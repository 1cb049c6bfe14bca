#!/usr/bin/env bash
# One call on the GPU machine: build every CUDA library, run the GPU tests, run the GPU benchmarks.
# Usage (repo root, results under $OUT):  bash benchmarks/gpu_check.sh [STEP ...]
#   no STEP: all of them, most important first (correctness before speed).
#   STEPs: build test_gpu bench_splitk kv_test_gpu pipeline_gpu stream_gpu bench_gemm_fp16 bench_decode kv_bench bench_gemm_bf16 test_cpu
# Budget: $QTOOL_GPU_BUDGET seconds in all (default 570, under the device tool's 600 s per call).
# Each step has its own limit, cut to what is left of the budget; a step that cannot get
# 20 s is not run, and a failed step does not stop the later ones. The summary lists every
# exit code; run the steps it lists as "not run" in a second call.
set -u
OUT=${OUT:-/tmp/qtool_gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_MODULE_LOADING=LAZY
BUDGET=${QTOOL_GPU_BUDGET:-570}
START=$(date +%s)
declare -A RC

step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if ((left < 20)); then
    RC[$name]="not run (budget)"; echo "=== $name not run: ${left}s of the budget left" | tee -a "$OUT/summary.txt"
    return
  fi
  ((secs > left)) && secs=$left
  echo "=== $name ($(date +%T), limit ${secs}s): $*" | tee -a "$OUT/summary.txt"
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  RC[$name]=$?
  echo "=== $name rc=${RC[$name]} after $(($(date +%s) - START))s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
}

{ nvidia-smi; nvcc --version; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  >"$OUT/env.txt" 2>&1
for mod in pytest tabulate; do  # no internet there: say up front if a step will fail for a missing module
  $PY -c "import $mod" 2>/dev/null || echo "WARNING: python module $mod missing; steps needing it will fail" | tee -a "$OUT/env.txt"
done
cat "$OUT/env.txt"
ARCH=$($PY -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")

run_step() {
  case $1 in
    # Both libraries (W4A16 and KV), for the local GPU only (sm_90 on H100/H200; sm_80 is covered by CPU CI).
    build) step build 120 $PY -m quant.kernels.build --arch "$ARCH" --jobs 16
           cat build/qtool_kernels/*.log build/qtool_kv/*.log >"$OUT/ptxas.log" 2>/dev/null ;;
    # No -x: on a first run every failing shape is worth seeing.
    test_gpu) step test_gpu 150 $PY -m pytest tests/test_kernels_gpu.py -q -p no:cacheprovider -rfs --tb=line --durations=8 ;;
    # The split-K GEMV beside the plain one at the batch sizes it is for, on down projections (K > N) and
    # square layers; * marks what the dispatch picks.
    bench_splitk) step bench_splitk 90 $PY benchmarks/bench_gemm.py --dtype fp16 --group-size 128 --m 1 4 8 16 32 \
                    --splits 2 4 8 --shapes 4864x896 8960x1536 11008x4096 14336x4096 18944x3584 13824x5120 \
                    28672x8192 4096x4096 --out "$OUT/RESULTS_gpu.md" ;;
    kv_test_gpu) step kv_test_gpu 60 $PY -m pytest tests/test_kv_kernels_gpu.py -q -p no:cacheprovider -rfs --tb=line ;;
    # Every method with its blocks on the GPU, against the same run on the CPU (tiny models).
    pipeline_gpu) step pipeline_gpu 150 $PY -m pytest tests/test_pipeline_gpu.py -q -p no:cacheprovider -rfs --tb=short ;;
    # Issue 15: the streaming path on the GPU (peak device memory against one block's weights; RTN, GPTQ, AWQ).
    stream_gpu) step stream_gpu 300 $PY benchmarks/stream_memory.py device --layers 16 --n-samples 32 \
                  --tmp /tmp/qtool-stream-gpu ;;
    bench_gemm_fp16) step bench_gemm_fp16 120 $PY benchmarks/bench_gemm.py --dtype fp16 --group-size 128 \
                       --m 1 4 16 32 64 128 256 1024 \
                       --out "$OUT/RESULTS_gpu.md" ;;
    bench_decode) step bench_decode 80 $PY benchmarks/bench_decode.py --batch 1 8 32 --steps 64 --split-k-ablation \
                    --out "$OUT/RESULTS_gpu.md"
                  step bench_decode_qwen 60 $PY benchmarks/bench_decode.py --shape qwen2.5-1.5b --batch 1 8 16 \
                    --steps 64 --split-k-ablation --out "$OUT/RESULTS_gpu.md" ;;
    kv_bench) step kv_bench 90 $PY benchmarks/bench_kv.py --sections decode --device cuda --decode-layers 8 \
                --out "$OUT/RESULTS_gpu.md" ;;
    bench_gemm_bf16) step bench_gemm_bf16 45 $PY benchmarks/bench_gemm.py --dtype bf16 --group-size 128 --m 1 16 256 1024 \
                       --shapes 4096x4096 4096x14336 8192x28672 --out "$OUT/RESULTS_gpu.md" ;;
    test_cpu) step test_cpu 45 $PY -m pytest tests/test_kernels_cpu.py -q -x -p no:cacheprovider ;;
    *) echo "unknown step $1" >&2; exit 2 ;;
  esac
}

STEPS=("$@")
((${#STEPS[@]})) || STEPS=(build test_gpu bench_splitk kv_test_gpu pipeline_gpu stream_gpu bench_gemm_fp16 bench_decode kv_bench bench_gemm_bf16)
for s in "${STEPS[@]}"; do run_step "$s"; done

echo "=== summary" | tee -a "$OUT/summary.txt"
for k in "${STEPS[@]}"; do
  echo "$k rc=${RC[$k]:-not run}" | tee -a "$OUT/summary.txt"
done
# The device tool returns at most 8 files: every log goes back in one archive, the tables beside it.
(cd "$OUT" && tar czf logs.tar.gz --remove-files -- *.log env.txt summary.txt 2>/dev/null)
