#!/usr/bin/env bash
# Streaming results on the lent GPU. Run from the repository root on the device, with .whl carried (leave out the
# shapes-t2i and shapes-t2v weights: the device takes 64 MiB and these runs need only shapes-ar's):
#   WHEELS=.whlq bash scripts/device_stream.sh speed   # Wan2.1-1.3B-shaped causal model: $OUT/stream_speed.json
#     (its FP8 attention needs the cuDNN frontend: carry .whlq, made as scripts/device_quant.sh says)
#   WHEELS=.whlq bash scripts/device_stream.sh compile   # the same with torch.compile: $OUT/stream_speed_compiled.json
#   bash scripts/device_stream.sh bench   # shapes-ar, every KV policy, 512 frames: $OUT/stream_bench.tar.gz
#     (METHODS=A:B,N runs methods A to B-1 and N beside full KV, to split the bench over calls; BENCH_ARGS adds
#     stream-bench options, e.g. "--no-full-kv --steps 20"; DTYPE defaults to bfloat16;
#     BENCH_SECONDS cuts it short, keeping the methods it finished; the device has no imageio-ffmpeg: make the
#     videos here, `tempocache stream-bench --report-only --out DIR`)
# Training shapes-ar goes through scripts/device_train.sh (shapes-ar, stream-evaluator).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:-.whl}"/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
if [ "$1" = compile ]; then  # bf16 eager, then compiled blocks, cuDNN-autotuned decoder, FP8: $OUT/stream_speed_compiled.json
  timeout "${SPEED_SECONDS:-540}" python3 benchmarks/stream_speed.py --compile --chunks "${CHUNKS:-20}" \
    --out "$OUT/stream_speed_compiled.json" 2>&1 | grep -v "^There are"
  exit
fi
if [ "$1" = speed ]; then
  python3 benchmarks/stream_speed.py --profile --chunks "${CHUNKS:-60}" --long-chunks "${LONG_CHUNKS:-1000}" --long-seconds "${LONG_SECONDS:-240}" \
    --out "$OUT/stream_speed.json" 2>&1 | grep -v "^There are"
  exit
fi
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
timeout "${BENCH_SECONDS:-36000}" python3 -m tempocache.cli stream-bench --device cuda --captions "${CAPTIONS:-16}" \
  --frames "${FRAMES:-512}" --dtype "${DTYPE:-bfloat16}" --methods "${METHODS:-:}" ${BENCH_ARGS:-} --no-videos --out /tmp/stream-bench 2>&1 | grep -v "Loading checkpoint"
tar czf "$OUT/stream_bench.tar.gz" -C /tmp stream-bench
