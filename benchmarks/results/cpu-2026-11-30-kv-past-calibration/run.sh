#!/bin/bash
# Issue 14 part 8: per-channel keys past the calibrated length, clamping (b59e18a) vs online widening (b671a94).
export OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
M=/root/.cache/qtool/models/SmolLM2-135M
D=/root/.cache/qtool/data/wiki_eval.txt
C=/tmp/kvm/calib256.safetensors
cd /tmp/wtk
echo "=== calibrate $(date +%T)"; $PY -m cli.main kv calibrate $M -o $C --n-samples 16 --seqlen 256 2>&1 | tail -3
for spec in "fp:" "new:--kv int8 --kv-keys token" "new:--kv int8 --kv-keys channel --kv-calib $C" "old:--kv int8 --kv-keys channel --kv-calib $C" "new:--kv int4 --kv-keys token" "new:--kv int4 --kv-keys channel --kv-calib $C" "old:--kv int4 --kv-keys channel --kv-calib $C"; do
  code=${spec%%:*}; args=${spec#*:}
  dir=/tmp/wtk; [ $code = old ] && dir=/tmp/wtb
  [ $code = fp ] && args=""
  echo "=== $code $args $(date +%T)"
  (cd $dir && $PY -m cli.main ppl $M --data $D --seqlen 2048 --max-tokens 4096 $args 2>&1 | tail -2)
done
echo "=== done $(date +%T)"
