#!/usr/bin/env bash
# Calibrate the shipped models' step-cache profiles on the lent GPU, both at once (small batches leave it idle).
# Run from the repository root on the device, with .whl carried: bash scripts/device_calibrate.sh
# 32 training captions: Auto's closed-loop refinement keeps a change only if it helps both halves of them.
# The profiles come back in $OUT; copy them to src/tempocache/reference/profiles/step_cache/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
for model in shapes-t2v shapes-t2i; do
  timeout 570 python3 -m tempocache.cli calibrate --model "$model" --device cuda --prompts 32 --out "$OUT/$model.json" >"$OUT/$model.log" 2>&1 &
done
wait
tail -n 3 "$OUT"/*.log
