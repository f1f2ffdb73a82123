#!/usr/bin/env bash
# Streaming understanding on the lent GPU. Run from the repository root on the device, with .whl and .whl_tf carried
# (leave every reference model's weights out but shapes-vqa's). tempocache.watch needs transformers >= 5.24, newer
# than the device's; .whl_tf brings it and the hub it needs. Once, here: echo /.whl_tf/ >> .git/info/exclude;
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl_tf \
#     transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
#   bash scripts/device_watch.sh speed           # 7B-shaped, random weights, an hour of video: $OUT/watch_speed.json
#   bash scripts/device_watch.sh bench WEIGHTS   # trained shapes-vqa: $OUT/eval_vqa.json, $OUT/watch-bench.tar.gz
#     (SPEED_ARGS adds watch_speed.py options, e.g. "--frames 4096 --only ReKV"; STREAMS, default 8;
#     SPEED_SECONDS, BENCH_SECONDS cut a run short)
set -uo pipefail
for wheels in .whl .whl_tf; do
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "/tmp/site$wheels" $wheels/*.whl
done
export PYTHONPATH=/tmp/site.whl_tf:/tmp/site.whl:$PWD/src PYTHONUNBUFFERED=1
if [ "$1" = speed ]; then
  timeout "${SPEED_SECONDS:-540}" python3 benchmarks/watch_speed.py --out "$OUT/watch_speed.json" ${SPEED_ARGS:-}
  exit
fi
weights=$2
python3 -m tempocache.cli eval-vqa --weights "$weights" --streams 32 --frames 512 --device cuda --save "$OUT/eval_vqa.json"
timeout "${BENCH_SECONDS:-400}" python3 -m tempocache.cli watch-bench --weights "$weights" --streams "${STREAMS:-8}" \
  --device cuda --out /tmp/watch-bench
tar czf "$OUT/watch-bench.tar.gz" -C /tmp watch-bench
