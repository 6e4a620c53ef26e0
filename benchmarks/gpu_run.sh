#!/usr/bin/env bash
# One batched GPU session: tests on the GPU, tuning, the layer benchmark, end-to-end and compile time.
# Usage (device machine, repository root): bash benchmarks/gpu_run.sh [steps...]; output under $OUT.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOECC_LOGS=warning
OUT=${OUT:-/tmp/moecc_out}; mkdir -p "$OUT"
export MOECC_CACHE_DIR=${MOECC_CACHE_DIR:-$OUT/cache}
steps=${*:-"env tests tune bench e2e compile"}
for step in $steps; do
  echo "=== $step $(date +%T)"
  case $step in
    env) nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
         python3 -c "import torch, triton, transformers as t; print(torch.__version__, triton.__version__, t.__version__)";;
    tests) timeout 150 python3 -m pytest -q tests/test_triton.py tests/test_ops.py 2>&1 | tee "$OUT/tests.txt" | tail -15;;
    tune) timeout 330 python3 - <<'PY'
from moecc.codegen.triton.tune import tune
import torch
tune([(8, 4096, 14336, 2), (128, 2048, 768, 8)], [1, 8, 64, 512, 4096, 16384], torch.bfloat16)
PY
         cp "$MOECC_CACHE_DIR/triton_configs.json" "$OUT/" ;;
    bench) timeout 300 python3 benchmarks/moe_layer.py --json "$OUT/moe_layer.json" 2>&1 | grep -v Warning | tee "$OUT/moe_layer.txt";;
    bench-quick) python3 benchmarks/moe_layer.py --no-compile 2>&1 | grep -v Warning | tee "$OUT/moe_layer_quick.txt";;
    profile) python3 benchmarks/profile_layer.py --tokens 1 64 512 4096 16384 --host 1 512 2>&1 | grep -v Warning | tee "$OUT/profile.txt";;
    e2e) python3 benchmarks/model_e2e.py e2e 2>&1 | grep -v Warning | tee "$OUT/e2e.txt";;
    compile) export TRITON_CACHE_DIR=/tmp/moecc_triton_cold; rm -rf "$TRITON_CACHE_DIR" "$MOECC_CACHE_DIR/captures"
             for run in cold warm; do
               MOECC_LOGS=info timeout 200 python3 benchmarks/model_e2e.py compile-time 2>&1 \
                 | grep -E "compile-time|captur|lowering|checking on|recognize" | sed "s/^/$run: /" | tee -a "$OUT/compile.txt"
             done;;
  esac
done
