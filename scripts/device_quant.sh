#!/usr/bin/env bash
# Quantization results on the lent GPU. Run from the repository root on the device, with .whlq carried: the
# diffusers and importlib_metadata wheels of .whl, torchao's and the cuDNN frontend's (FP8 attention), without
# cache-dit, slimmed to stay under the device's 64 MiB tree limit. Once, here: echo /.whlq/ >> .git/info/exclude;
# mkdir -p .whlq; cp .whl/diffusers-* .whl/importlib_metadata-* .whlq/; pip download --no-deps --only-binary=:all:
#   --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whlq torchao==0.18.0 nvidia-cudnn-frontend==1.16.0
# python scripts/slim_wheels.py .whlq
# Then, on the device:
#   bash scripts/device_quant.sh speed     # Wan2.1-1.3B-shaped speed and memory: $OUT/quant_speed.json
#   bash scripts/device_quant.sh quality   # fit TimestepAdaptive's predictors (32 training captions), then
#                                          # quant-quality on both models: $OUT/*.json, profiles.tar.gz
#   QUANTIZED_CACHE_PROFILE=1 bash scripts/device_quant.sh quality   # also the step cache profiled on the FP8 model
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whlq/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
if [ "$1" = speed ]; then
  python3 benchmarks/quant_speed.py --out "$OUT/quant_speed.json" 2>&1 | grep -v "^Loading"
  exit
fi
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1  # as for the step-cache profiles
out=/tmp/quant && mkdir -p $out
for model in shapes-t2v shapes-t2i; do
  for format in fp8 int8; do
    python3 -m tempocache.cli calibrate --model "$model" --device cuda --prompts 32 --quant-predictor "$format" \
      --out "src/tempocache/reference/profiles/quant/$model-$format.json" >"$out/calibrate-$model-$format.log" 2>&1 &
  done
done
cache_profile=()
if [ -n "${QUANTIZED_CACHE_PROFILE:-}" ]; then  # CacheQuant's row: the step cache profiled on the FP8 model (slow)
  python3 -m tempocache.cli calibrate --model shapes-t2v --device cuda --quantized fp8 \
    --out "$out/shapes-t2v-fp8-quantized.json" >"$out/calibrate-cache-quantized.log" 2>&1
  cache_profile=(--cache-profile "$out/shapes-t2v-fp8-quantized.json")
fi
wait
tar czf "$OUT/profiles.tar.gz" src/tempocache/reference/profiles/quant $out/calibrate-*.log
python3 -m tempocache.cli quant-quality --model shapes-t2i --device cuda --captions "${CAPTIONS:-64}" --batch-size 64 \
  --save "$OUT/quant_quality_shapes-t2i.json" >"$out/quant-quality-shapes-t2i.log" 2>&1 &
python3 -m tempocache.cli quant-quality --model shapes-t2v --device cuda --captions "${CAPTIONS:-64}" --batch-size 64 \
  "${cache_profile[@]}" --save "$OUT/quant_quality_shapes-t2v.json" >"$out/quant-quality-shapes-t2v.log" 2>&1
wait
tar czf "$OUT/logs.tar.gz" -C /tmp quant
tail -n 3 $out/calibrate-*.log
grep -h -A30 "^| quantization" $out/quant-quality-*.log
