#!/usr/bin/env bash
# Train, or continue training, the reference models and the evaluator on the lent GPU.
# Run from the repository root on the device, with .whl carried (see README "Training"):
#   bash scripts/device_train.sh MINUTES [shapes-t2v] [shapes-t2i] [shapes-ar] [shapes-edit] [shapes-vqa] [evaluator] [stream-evaluator]
# (shapes-ar starts from shapes-t2v's weights when it has none of its own, shapes-edit from shapes-t2i's;
# stream-evaluator trains on endless clips; shapes-vqa, the video-QA model, trains on ShapesStream with train-vqa.
# Leave the weights a run does not need out of the tree, e.g. shapes-t2i's for shapes-ar: the device takes 64 MiB.)
# TRAIN_ARGS adds options to every train-reference (e.g. "--compile --batch-size 64").
# Resumes from /tmp/ckpt when the machine is still warm, else from the shipped weights.
# Everything trained comes back in $OUT as weights.tar.part-* (15 MB pieces).
set -euo pipefail
minutes=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
shipped=src/tempocache/reference/weights
rm -rf /tmp/train && mkdir -p /tmp/train/reference
for what in "$@"; do
  if [ "$what" = evaluator ] || [ "$what" = stream-evaluator ]; then
    endless=$([ "$what" = stream-evaluator ] && echo --endless || true)
    python3 -m tempocache.cli train-evaluator --out "/tmp/train/$what" --minutes "$minutes" --workers 5 $endless \
      > "$OUT/$what.log" 2>&1 &
  elif [ "$what" = shapes-vqa ]; then
    python3 -m tempocache.cli train-vqa --out "/tmp/train/reference/$what" --minutes "$minutes" \
      --resume "$shipped/$what" --checkpoint-dir /tmp/ckpt --workers 5 ${TRAIN_ARGS:-} > "$OUT/$what.log" 2>&1 &
  else
    python3 -m tempocache.cli train-reference --model "$what" --out "/tmp/train/reference/$what" --minutes "$minutes" \
      --resume "$shipped/$what" --checkpoint-dir /tmp/ckpt --workers 5 ${TRAIN_ARGS:-} > "$OUT/$what.log" 2>&1 &
  fi
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
tail -n 3 "$OUT"/*.log
tar -C /tmp/train -cf - . | split -b 15M - "$OUT/weights.tar.part-"
exit $status
