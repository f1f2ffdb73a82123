#!/usr/bin/env bash
# `tempocache bench` on the lent GPU. Run from the repository root on the device, with .whl carried:
#   bash scripts/device_bench.sh [bench options...]   # default: shapes-t2v, 16 frames, 16 held-out captions
# The report comes back in $OUT as bench.tar.gz (results.json, table.md, pareto.png, index.html, gifs/).
# TF32 matmuls (for every method alike) keep all 77 settings inside one 10-minute device call.
# WHEELS=.whlq (see scripts/device_quant.sh) brings torchao instead of cache-dit, for the quantization methods.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:-.whl}"/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
args=("$@"); [ ${#args[@]} -gt 0 ] || args=(--model shapes-t2v --frames 16 --captions 16 --batch-size 16 --repeats 2 --sample-clips 1)
timeout 570 python3 -m tempocache.cli bench --device cuda --out /tmp/bench "${args[@]}" \
    2> >(grep --line-buffered -v "Cache-DiT" > "$OUT/bench.log") | tee "$OUT/stdout.txt"
status=${PIPESTATUS[0]}
[ -d /tmp/bench ] && tar -czf "$OUT/bench.tar.gz" -C /tmp bench
exit "$status"
