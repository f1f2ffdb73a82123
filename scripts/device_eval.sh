#!/usr/bin/env bash
# Evaluate the shipped models on the lent GPU and redraw their cards.
# Run from the repository root on the device, with .whl carried:
#   bash scripts/device_eval.sh [GUIDANCE ...]
# Prints a guidance sweep (64 held-out captions, one sample each) for each GUIDANCE given, then runs
# `tempocache eval-reference` at the models' defaults (64 captions x 4 samples) and writes the model cards.
# FRAMES="8 16" also evaluates shapes-t2v at each of those clip lengths (64 captions x 4 samples each).
# Results come back in $OUT: reference_eval.json, reference_eval_shapes-t2v_<N>frames.json, sweep.txt, cards.tar.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
for g in "$@"; do
  echo "guidance $g" | tee -a "$OUT/sweep.txt"
  python3 -m tempocache.cli eval-reference --device cuda --batch-size 64 --guidance "$g" 2>/dev/null | tee -a "$OUT/sweep.txt"
done
for f in ${FRAMES:-}; do
  python3 -m tempocache.cli eval-reference --model shapes-t2v --device cuda --batch-size 64 --frames "$f" \
    --samples-per-caption 4 --save "$OUT/reference_eval_shapes-t2v_${f}frames.json"
done
python3 -m tempocache.cli eval-reference --device cuda --batch-size 64 --samples-per-caption 4 --save "$OUT/reference_eval.json"
python3 -m tempocache.reference.card --device cuda --results "$OUT/reference_eval.json"
tar -cf "$OUT/cards.tar" src/tempocache/reference/weights/*/README.md src/tempocache/reference/weights/*/*.png src/tempocache/eval/weights/README.md
