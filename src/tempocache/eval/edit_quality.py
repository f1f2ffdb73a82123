"""How well an image carries out a ShapesWorld edit: the change made, everything else kept, against the ground truth.

Per edit, from the evaluator's reading of the edited image (its attributes, slotted by colour)
and from pixels:
- `changed`: the requested change is there. Recolour: the new colour present with the object's
  shape, the old one gone; remove: the colour gone; add: the new colour present with its shape;
  background: the new background. A move changes no attribute, so it is judged in pixels: inside
  the edit mask the image is closer to the target than to the source (mean absolute error).
- `kept`: every attribute the edit does not touch reads as in the target: the other objects'
  colours and shapes, the background for a local edit, and no object the target lacks.
- `psnr_outside`: PSNR against the target outside the edit mask (infinite where equal).
"""

from __future__ import annotations

import numpy as np
import torch

from ..reference.edits import Edit, render_edit
from ..reference.shapesworld import BACKGROUND_NAMES, COLOUR_NAMES, SHAPES
from .evaluator import AttributeClassifier
from .metrics import read_clips


def judge_edits(evaluator: AttributeClassifier, images: torch.Tensor, edits: list[Edit]) -> list[dict]:
    """`images` (B, 3, H, W) in [0, 1], the edited images of `edits` in order: per edit, changed, kept, psnr_outside."""
    if len(images) != len(edits):
        raise ValueError(f"{len(images)} images for {len(edits)} edits")
    _, logits = read_clips(evaluator, images.permute(0, 2, 3, 1)[:, None])
    present, shape = logits["present"] > 0, logits["shape"].argmax(-1)
    background = logits["background"].argmax(-1)
    rows = []
    for i, edit in enumerate(edits):
        source, target, mask = render_edit(edit, images.shape[-1])
        image = images[i].float().cpu()

        def has(obj) -> bool:
            c = COLOUR_NAMES.index(obj.colour)
            return bool(present[i, c]) and shape[i, c] == SHAPES.index(obj.shape)

        words = edit.instruction.split()
        if edit.kind == "move":
            changed = bool((image - target).abs()[:, mask].mean() < (image - source).abs()[:, mask].mean())
        elif edit.kind == "background":
            changed = background[i] == BACKGROUND_NAMES.index(edit.target.background)
        else:
            gone = {o.colour for o in edit.source.objects} - {o.colour for o in edit.target.objects}
            new = [o for o in edit.target.objects if o not in edit.source.objects]
            changed = all(not present[i, COLOUR_NAMES.index(c)] for c in gone) and all(has(o) for o in new)
        untouched = [o for o in edit.target.objects if o.colour not in words]
        extra = set(COLOUR_NAMES) - {o.colour for o in edit.target.objects} - set(words)
        kept = all(has(o) for o in untouched) and not any(present[i, COLOUR_NAMES.index(c)] for c in extra)
        if edit.kind != "background":
            kept = kept and background[i] == BACKGROUND_NAMES.index(edit.target.background)
        error = (image - target).square()[:, ~mask].mean().item() if (~mask).any() else 0.0
        rows.append({"changed": bool(changed), "kept": bool(kept),
                     "psnr_outside": float("inf") if error == 0 else 10 * np.log10(1 / error)})
    return rows
