#!/usr/bin/env bash
# Quantization results on the lent GPU. Run from the repository root on the device, with .whlq carried: the
# diffusers and importlib_metadata wheels of .whl (slimmed, see README) and torchao's, without cache-dit, to stay
# under the device's 64 MiB tree limit. Once, here: echo /.whlq/ >> .git/info/exclude; mkdir -p .whlq;
# cp .whl/diffusers-* .whl/importlib_metadata-* .whlq/; pip download --no-deps --only-binary=:all: --python-version 3.12
#   --platform manylinux_2_28_x86_64 -d .whlq torchao==0.18.0
# Then, on the device:
#   bash scripts/device_quant.sh speed     # Wan2.1-1.3B-shaped speed and memory: $OUT/quant_speed.json
#   bash scripts/device_quant.sh quality   # fit TimestepAdaptive's predictors and a step-cache profile of the
#                                          # FP8 model, then quant-quality on both models: $OUT/quant.tar.gz
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
    python3 -m tempocache.cli calibrate --model "$model" --device cuda --quant-predictor "$format" \
      --out "src/tempocache/quant/profiles/$model-$format.json" >"$out/calibrate-$model-$format.log" 2>&1 &
  done
done
python3 -m tempocache.cli calibrate --model shapes-t2v --device cuda --quantized fp8 \
  --out "$out/shapes-t2v-fp8-quantized.json" >"$out/calibrate-cache-quantized.log" 2>&1 &
cache=$!
wait -n; wait -n; wait -n; wait -n  # the four predictors (the step-cache profile takes longer)
cp -r src/tempocache/quant/profiles $out/
python3 -m tempocache.cli quant-quality --model shapes-t2i --device cuda --captions "${CAPTIONS:-64}" --batch-size 64 \
  --save "$out/quant_quality_shapes-t2i.json" >"$out/quant-quality-shapes-t2i.log" 2>&1 &
wait $cache
python3 -m tempocache.cli quant-quality --model shapes-t2v --device cuda --captions "${CAPTIONS:-64}" --batch-size 64 \
  --cache-profile "$out/shapes-t2v-fp8-quantized.json" --save "$out/quant_quality_shapes-t2v.json" >"$out/quant-quality-shapes-t2v.log" 2>&1
wait
tar czf "$OUT/quant.tar.gz" -C /tmp quant
grep -h -A20 "^| quantization" $out/quant-quality-*.log
