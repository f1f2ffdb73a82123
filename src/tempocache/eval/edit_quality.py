"""How well an image carries out a ShapesWorld edit: the change made, everything else kept, against the ground truth.

Per edit, from the evaluator's reading of the edited image (its attributes, slotted by colour)
and from pixels:
- `changed`: the requested change is there. Recolour: the new colour present with the object's
  shape, the old one gone; remove: the colour gone; add: the new colour present with its shape;
  background: the new background. A move changes no attribute, so it is judged in pixels: inside
  the edit mask the image is closer to the target than to the source (mean absolute error).
- `kept`: every attribute the edit does not touch reads as in the target: the other objects'
  colours and shapes, the background for a local edit, and no object the target lacks.
- `psnr_outside`: PSNR against the target outside the edit mask (infinite where equal). An added
  object's place is not in its instruction, so for an add the mask also covers where the image shows
  the new colour (within ADDED_COLOUR_DISTANCE, grown by a pixel): wherever the editor put it.
"""

from __future__ import annotations

import datetime
import platform
import time

import numpy as np
import torch
from scipy import ndimage

from ..reference.edits import KINDS, Edit, render_edit
from ..reference.shapesworld import BACKGROUND_NAMES, COLOUR_NAMES, COLOURS, SHAPES
from .evaluator import AttributeClassifier
from .metrics import read_clips

BARS = {"changed": 0.85, "kept": 0.9, "psnr_outside_median": 30.0}  # an editor's, on held-out edits
ADDED_COLOUR_DISTANCE = 0.2  # per channel, in [0, 1]: a pixel this close to the added colour is the new object's


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
        if edit.kind == "add":
            colour = torch.tensor(COLOURS[words[2]]) / 255
            drawn = ((image - colour[:, None, None]).abs().amax(0) < ADDED_COLOUR_DISTANCE).numpy()
            mask = mask | torch.from_numpy(ndimage.binary_dilation(drawn, np.ones((3, 3), bool)))
        error = (image - target).square()[:, ~mask].mean().item() if (~mask).any() else 0.0
        rows.append({"changed": bool(changed), "kept": bool(kept),
                     "psnr_outside": float("inf") if error == 0 else 10 * np.log10(1 / error)})
    return rows


def in_group(edit: Edit, group: str) -> bool:
    """Whether `edit` counts in `summarize_edits`' group `group`: its kind, or "local" for any but background."""
    return edit.kind == group or (group == "local" and edit.kind != "background")


def summarize_edits(rows: list[dict], edits: list[Edit]) -> dict:
    """Per kind, and for the local kinds together: the share changed, the share kept, the share both (success), the
    median PSNR outside the mask (the median, since an image equal to its target outside the mask reads infinite)."""
    names = list(dict.fromkeys(e.kind for e in edits))
    if len(names) > 1 and any(in_group(e, "local") for e in edits):
        names.append("local")
    groups = {name: [r for r, e in zip(rows, edits) if in_group(e, name)] for name in names}
    return {name: {"edits": len(group), "changed": float(np.mean([r["changed"] for r in group])),
                   "kept": float(np.mean([r["kept"] for r in group])),
                   "success": float(np.mean([r["changed"] and r["kept"] for r in group])),
                   "psnr_outside_median": float(np.median([r["psnr_outside"] for r in group]))}
            for name, group in groups.items()}


def partition_scores(edited: torch.Tensor, masks: torch.Tensor, patch: int = 2) -> list[dict]:
    """Per edit, a partition's recall and IoU against the ground truth: `edited` (B, N) bool over the image's tokens,
    `masks` (B, H, W) the pixels the edit changes; a token is edited where any of its patch x patch pixels is."""
    truth = torch.nn.functional.max_pool2d(masks[:, None].float(), patch)[:, 0].flatten(1).bool()
    if truth.shape != edited.shape:
        raise ValueError(f"a partition of {edited.shape[1]} tokens for masks of {truth.shape[1]} tokens")
    edited = edited.cpu()
    hit, union = (edited & truth).sum(1), (edited | truth).sum(1)
    return [{"recall": float(h / t) if t else 1.0, "iou": float(h / u) if u else 1.0,
             "edited_fraction": float(e.float().mean())} for h, u, t, e in zip(hit, union, truth.sum(1), edited)]


def evaluate_editor(model: str = "shapes-edit", edits: int = 200, steps: int | None = None, guidance: float | None = None,
                    device: str = "cpu", batch_size: int = 25, seed: int = 0) -> dict:
    """Edit `edits` held-out ShapesWorld edits (the kinds in turn, edit i with seed `seed + i`) at full compute and
    judge them: per kind, the share changed, kept, both, and the median PSNR outside the mask."""
    from ..editing import edit
    from ..generation import load_pipeline
    from ..reference.edits import held_out_edits
    from .evaluator import load_evaluator

    if edits < len(KINDS):
        raise ValueError(f"judge at least one edit of each of the {len(KINDS)} kinds, got {edits}")
    pipe = load_pipeline(model, device)
    pipe.set_progress_bar_config(disable=True)
    listed = held_out_edits(edits, seed)
    start = time.time()
    images = np.concatenate([edit([render_edit(e)[0] for e in listed[i:i + batch_size]],
                                  [e.instruction for e in listed[i:i + batch_size]], steps=steps, guidance=guidance,
                                  seed=seed + i, pipe=pipe).reshape(-1, pipe.spec.size, pipe.spec.size, 3)
                             for i in range(0, edits, batch_size)])
    seconds = time.time() - start
    rows = judge_edits(load_evaluator(device), torch.from_numpy(images).permute(0, 3, 1, 2), listed)
    return {"model": model, "edits": edits, "steps": pipe.spec.default_steps if steps is None else steps,
            "guidance": pipe.spec.default_guidance if guidance is None else guidance, "seed": seed,
            "quality": summarize_edits(rows, listed), "sampling_seconds": round(seconds, 1),
            "device": torch.cuda.get_device_name() if str(device).startswith("cuda") else
            f"cpu ({platform.processor() or platform.machine()})", "date": datetime.date.today().isoformat()}
