#!/usr/bin/env bash
# Step-cache results on the lent GPU. Run from the repository root on the device, with .whl carried:
#   bash scripts/device_step_cache.sh quality [model...]  # every policy vs full compute, with the shipped profiles
#   bash scripts/device_step_cache.sh overhead   # Wan2.1-1.3B-shaped overhead and Auto speedup
# Results come back in $OUT.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# TF32 as in scripts/device_calibrate.sh, which made the shipped profiles
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
if [ "$1" = quality ]; then
  shift
  models=("$@"); [ ${#models[@]} -gt 0 ] || models=(shapes-t2v shapes-t2i)
  for model in "${models[@]}"; do  # in parallel: one model's batches leave the GPU idle
    python3 -m tempocache.cli cache-quality --model "$model" --device cuda --captions "${CAPTIONS:-64}" --batch-size 64 \
      --save "$OUT/step_cache_quality_$model.json" >"$OUT/$model.log" 2>&1 &
  done
  wait
  tail -n 40 "$OUT"/*.log
else
  python3 benchmarks/step_cache_overhead.py --out "$OUT/step_cache_overhead.json"
fi
