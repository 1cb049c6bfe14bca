#!/usr/bin/env bash
# One device call: GEMV kernel variants built in turn, each checked against the reference and timed in the
# same call, then Nsight Compute on the last variant's 4096x4096 M = 1 launch.
# Usage (repo root, GPU machine): bash benchmarks/gemv_variants.sh [VARIANT ...]
#   (default: tree patch:benchmarks/kernel_variants/gemv_prefetch.patch)
#   tree: csrc/w4a16_gemv.cu as it is; patch:FILE: the tree's kernel with FILE applied (patch -p1);
#   base: .gemv_base/w4a16_gemv.cu (a copy carried with the call); u<N>: the tree's kernel with kUnroll = N.
#   Every GPU test runs on the last variant; the others get the GEMV sweeps.
# Leaves csrc/w4a16_gemv.cu as it found it, and the library built from the last variant (rebuild after).
# Tables: $OUT/<VARIANT>.md; logs and the ncu report (ncu_last.txt) in $OUT/logs.tar.gz.
set -u
OUT=${OUT:-/tmp/qtool_gemv_variants}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SRC=csrc/w4a16_gemv.cu
ORIG=$(mktemp)  # outside $OUT: the archive at the end empties $OUT
cp "$SRC" "$ORIG"
trap 'cp "$ORIG" "$SRC"' EXIT
SHAPES="4096x4096 4096x14336 8192x28672 14336x4096 8960x1536"
VARIANTS=("$@")
((${#VARIANTS[@]})) || VARIANTS=(tree patch:benchmarks/kernel_variants/gemv_prefetch.patch)
LAST=${VARIANTS[-1]}
tag() { echo "$1" | sed 's#.*/##; s/[^A-Za-z0-9_.-]/_/g'; }  # a variant's name for file names
for u in "${VARIANTS[@]}"; do
  tag=$(tag "$u")
  case $u in
    tree) cp "$ORIG" "$SRC" ;;
    base) cp .gemv_base/w4a16_gemv.cu "$SRC" || { echo "base: no .gemv_base/w4a16_gemv.cu"; continue; } ;;
    patch:*) cp "$ORIG" "$SRC"
             patch -p1 --quiet <"${u#patch:}" || { echo "$u: does not apply"; continue; } ;;
    u*) sed "s/constexpr int kUnroll = [0-9]*;/constexpr int kUnroll = ${u#u};/" "$ORIG" >"$SRC"
        grep -q "kUnroll = ${u#u};" "$SRC" || { echo "$u: could not set kUnroll"; continue; } ;;
    *) echo "unknown variant $u"; continue ;;
  esac
  touch "$SRC"
  if ! $PY -m quant.kernels.build --arch 90 --jobs 16 --library kernels >"$OUT/build_$tag.log" 2>&1; then
    echo "$u: build failed"; tail -5 "$OUT/build_$tag.log"; continue
  fi
  grep -h "registers" build/qtool_kernels/*gemv*.log 2>/dev/null | sort | uniq -c >"$OUT/regs_$tag.txt"
  sel=(-k "sweep or split_k_gemv_matches")
  [[ $u == "$LAST" ]] && sel=()  # the version to land: every GPU test
  $PY -m pytest tests/test_kernels_gpu.py -q -p no:cacheprovider --tb=line "${sel[@]}" >"$OUT/test_$tag.log" 2>&1
  echo "$u tests: $(tail -n 1 "$OUT/test_$tag.log")"
  $PY benchmarks/bench_gemm.py --dtype fp16 --group-size 128 --m 1 8 16 32 --splits 4 --shapes $SHAPES \
    --out "$OUT/$tag.md" >"$OUT/bench_$tag.log" 2>&1 || echo "$u: bench failed"
  if [[ $u == "$LAST" ]] && command -v ncu >/dev/null; then
    cat >"$OUT/one_gemv.py" <<'PYEOF'
import torch
from quant.kernels import layout, loader
from quant.formats import PackedWeight
assert loader.load_library() is None
n = k = 4096
pw = PackedWeight(q=torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda"),
                  scale=(torch.rand(n, k // 128, device="cuda") * 0.01).half(),
                  zero=torch.randint(0, 16, (n, k // 128), dtype=torch.int32, device="cuda"), bits=4, group_size=128)
kw = layout.repack(pw, torch.float16)
x = torch.randn(1, k, device="cuda", dtype=torch.float16)
for _ in range(5):
    torch.ops.qtool.w4a16_gemv(x, kw.qweight, kw.scales, kw.zeros, None, 128)
torch.cuda.synchronize()
PYEOF
    timeout 120 ncu --clock-control none --kernel-name regex:gemv_kernel --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
      --section LaunchStats $PY "$OUT/one_gemv.py" >"$OUT/ncu_last.txt" 2>&1 || echo "ncu rc=$?"
  fi
done
for u in "${VARIANTS[@]}"; do
  tag=$(tag "$u")
  echo "== $u (us; * = dispatched)"
  grep -E "^\|\s+[0-9]" "$OUT/$tag.md" 2>/dev/null | awk -F'|' '$5 ~ /qtool gemv/ {printf "%s x %s m=%s %-22s %s\n",$2,$3,$4,$5,$6}'
done
grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers|Stall|Warp Cycles|Eligible|Issued" \
  "$OUT/ncu_last.txt" 2>/dev/null | head -40
# The device tool returns at most 8 files: the logs go back in one archive, the tables beside it.
(cd "$OUT" && tar czf logs.tar.gz --remove-files -- *.log *.txt *.py 2>/dev/null)
