#!/usr/bin/env bash
# `tempocache bench` on the lent GPU. Run from the repository root on the device, with .whl carried:
#   bash scripts/device_bench.sh [bench options...]   # default: shapes-t2v, 16 frames, 16 held-out captions
# The report comes back in $OUT as $NAME.tar.gz (results.json, table.md, pareto.png, index.html, gifs/), the log as
# $NAME.log (NAME defaults to bench, so that one call can run several benches); BENCH_SECONDS cuts a bench short (570).
# TF32 matmuls (for every method alike) keep all 77 settings inside one 10-minute device call.
# WHEELS=.whlq (see scripts/device_quant.sh) brings torchao instead of cache-dit, for the quantization methods.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:-.whl}"/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
name=${NAME:-bench}
args=("$@"); [ ${#args[@]} -gt 0 ] || args=(--model shapes-t2v --frames 16 --captions 16 --batch-size 16 --repeats 2 --sample-clips 1)
timeout "${BENCH_SECONDS:-570}" python3 -m tempocache.cli bench --device cuda --out "/tmp/$name" "${args[@]}" \
    2> >(grep --line-buffered -v "Cache-DiT" > "$OUT/$name.log")
status=$?
[ -d "/tmp/$name" ] && tar -czf "$OUT/$name.tar.gz" -C /tmp "$name"
exit "$status"
