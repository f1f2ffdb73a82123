"""ShapesWorld edits: seeded (source image, instruction, target image) triplets with exactly one change.

Five kinds, each an instruction from a small grammar:

    recolour    "make the red square blue"      one object takes a colour no other object or the background has
    remove      "remove the red square"         one of two objects goes
    add         "add a blue circle"             a second object appears, apart from the first
    move        "move the red square left"      one object shifts a quarter of the frame, staying in it
    background  "make the background white"    the global edit: every pixel outside the objects changes

Images are ShapesWorld's still scenes (no motion), rendered as `shapesworld.render` renders a
frame, so a source and its target differ only where the edit says: the pixels that differ
are the ground-truth edit mask. The held-out split is over edit combinations, as captions'
is over objects': an edit (kind, the shape, the attribute before and after, the background)
is reserved for evaluation when a fixed hash says so.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch

from .shapesworld import (BACKGROUND_NAMES, COLOUR_NAMES, DEFAULT_SIZE, HELD_OUT_PERCENT, SHAPES, SPLITS, Scene,
                          ShapeObject, _far_apart, _layout, render, sample_scene)

KINDS = ("recolour", "remove", "add", "move", "background")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOVE = 0.25  # how far an object moves, as a fraction of the frame
MASK_THRESHOLD = 1 / 255  # a pixel is edited when a channel changes by more than this


@dataclass(frozen=True)
class Edit:
    """One edit: the scene before and after, each object's (x, y, r, 0, 0, 1) placement in pixels, the instruction."""

    kind: str
    instruction: str
    source: Scene
    target: Scene
    source_layout: np.ndarray
    target_layout: np.ndarray

    def combination(self) -> tuple[str, ...]:
        """What the held-out split is over: kind, the shape edited, its colour, what it becomes (or "-"), and the
        background; for a background edit, the background before and after."""
        words = self.instruction.split()
        if self.kind == "background":
            return (self.kind, "-", self.source.background, words[3], "-")
        return (self.kind, words[3], words[2], words[4] if len(words) == 5 else "-", self.source.background)

    def is_held_out(self) -> bool:
        return zlib.crc32("/".join(self.combination()).encode()) % 100 < HELD_OUT_PERCENT


def vocabulary() -> tuple[str, ...]:
    """Every word an instruction can use, sorted."""
    return tuple(sorted({"make", "the", "remove", "add", "a", "move", "background", *SHAPES, *COLOUR_NAMES,
                         *BACKGROUND_NAMES, *DIRECTIONS}))


def check_instruction(instruction: str) -> None:
    """Raise ValueError, naming the word and what is accepted, for an instruction outside the grammar."""
    words = instruction.lower().split()
    unknown = [w for w in words if w not in vocabulary()]
    if unknown:
        raise ValueError(f"unknown word(s) {', '.join(map(repr, unknown))} in {instruction!r}; instructions use "
                         f"only: {' '.join(vocabulary())}")
    forms = {
        "recolour": len(words) == 5 and words[:2] == ["make", "the"] and words[2] in COLOUR_NAMES and
        words[3] in SHAPES and words[4] in COLOUR_NAMES,
        "remove": len(words) == 4 and words[:2] == ["remove", "the"] and words[2] in COLOUR_NAMES and words[3] in SHAPES,
        "add": len(words) == 4 and words[:2] == ["add", "a"] and words[2] in COLOUR_NAMES and words[3] in SHAPES,
        "move": len(words) == 5 and words[:2] == ["move", "the"] and words[2] in COLOUR_NAMES and words[3] in SHAPES
        and words[4] in DIRECTIONS,
        "background": len(words) == 4 and words[:3] == ["make", "the", "background"] and words[3] in BACKGROUND_NAMES,
    }
    if not any(forms.values()):
        raise ValueError(f"{instruction!r} is not an edit: give 'make the <colour> <shape> <colour>', 'remove the "
                         f"<colour> <shape>', 'add a <colour> <shape>', 'move the <colour> <shape> <left|right|up|down>'"
                         f" or 'make the background <colour>'")


def sample_edit(rng: np.random.Generator, split: str = "train", kind: str | None = None,
                size: int = DEFAULT_SIZE) -> Edit:
    """An edit from `split` ("train", "held_out" or "all"), of `kind` (default: one of KINDS, uniformly)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; kinds are {', '.join(KINDS)}")
    kind = kind or KINDS[rng.integers(len(KINDS))]
    while True:
        edit = _draw_edit(rng, kind, size)
        if edit is not None and (split == "all" or edit.is_held_out() == (split == "held_out")):
            return edit


def _draw_edit(rng: np.random.Generator, kind: str, size: int) -> Edit | None:
    """One attempt at an edit of `kind`; None where the drawn scene does not allow it."""
    count = 2 if kind == "remove" else 1 if kind == "add" else None
    scene = sample_scene(rng, "all", with_motion=False, count=count)
    if kind == "add":
        both = _with_object(scene, rng)
        if both is None:
            return None
        layout = _layout(rng, both, size)
        if not _far_apart(layout):
            return None
        new = next(i for i, o in enumerate(both.objects) if o not in scene.objects)
        return Edit(kind, f"add a {both.objects[new].colour} {both.objects[new].shape}", scene, both,
                    np.delete(layout, new, 0), layout)
    layout = _layout(rng, scene, size)
    if len(scene.objects) == 2 and not _far_apart(layout):
        return None
    i = rng.integers(len(scene.objects))
    obj = scene.objects[i]
    if kind == "background":
        choices = _unused(scene, BACKGROUND_NAMES)
        new = choices[rng.integers(len(choices))]
        return Edit(kind, f"make the background {new}", scene, replace(scene, background=new), layout, layout)
    if kind == "recolour":
        choices = _unused(scene, COLOUR_NAMES)
        colour = choices[rng.integers(len(choices))]
        objects = list(scene.objects)
        objects[i] = replace(obj, colour=colour)
        order = np.argsort([COLOUR_NAMES.index(o.colour) for o in objects], kind="stable")
        target = replace(scene, objects=tuple(objects[j] for j in order))
        return Edit(kind, f"make the {obj.colour} {obj.shape} {colour}", scene, target, layout, layout[order])
    if kind == "remove":
        target = replace(scene, objects=tuple(o for j, o in enumerate(scene.objects) if j != i))
        return Edit(kind, f"remove the {obj.colour} {obj.shape}", scene, target, layout, np.delete(layout, i, 0))
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    moved = layout.copy()
    moved[i, :2] += np.array(DIRECTIONS[direction]) * MOVE * size
    x, y, r = moved[i, :3]
    if not (r <= x <= size - r and r <= y <= size - r) or len(moved) == 2 and not _far_apart(moved):
        return None
    return Edit(kind, f"move the {obj.colour} {obj.shape} {direction}", scene, scene, layout, moved)


def _with_object(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """The scene with a second object of a colour its object and background do not have, in caption order."""
    choices = _unused(scene, COLOUR_NAMES)
    if not choices:
        return None
    new = ShapeObject(SHAPES[rng.integers(len(SHAPES))], choices[rng.integers(len(choices))], "static")
    objects = sorted([*scene.objects, new], key=lambda o: COLOUR_NAMES.index(o.colour))
    return replace(scene, objects=tuple(objects))


def _unused(scene: Scene, names: tuple[str, ...]) -> list[str]:
    """The colour names of `names` that neither an object of the scene nor its background has."""
    used = {o.colour for o in scene.objects} | {scene.background}
    return [n for n in names if n not in used]


def render_edit(edit: Edit, size: int = DEFAULT_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source, target) images (3, H, W) in [0, 1] and the edit mask (H, W), bool: where they differ."""
    source = render(edit.source, edit.source_layout, 1, size)[0]
    target = render(edit.target, edit.target_layout, 1, size)[0]
    return source, target, (target - source).abs().amax(0) > MASK_THRESHOLD


def held_out_edits(count: int, seed: int = 0, size: int = DEFAULT_SIZE, kinds: tuple[str, ...] = KINDS) -> list[Edit]:
    """`count` held-out edits of `kinds`, in turn (so balanced), in a fixed order for a given seed."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"edit kinds are {', '.join(KINDS)}; got {', '.join(map(repr, kinds)) or 'none'}")
    rng = np.random.default_rng(seed)
    return [sample_edit(rng, "held_out", kinds[i % len(kinds)], size) for i in range(count)]


@dataclass
class EditBatch:
    sources: torch.Tensor  # (B, 3, H, W) in [0, 1]
    targets: torch.Tensor
    masks: torch.Tensor  # (B, H, W) bool
    edits: list[Edit]

    def instructions(self) -> list[str]:
        return [e.instruction for e in self.edits]


def sample_edit_batch(rng: np.random.Generator, batch_size: int, split: str = "train",
                      size: int = DEFAULT_SIZE) -> EditBatch:
    """`batch_size` edits from `split`, the kinds drawn uniformly, rendered."""
    edits = [sample_edit(rng, split, size=size) for _ in range(batch_size)]
    sources, targets, masks = (torch.stack(t) for t in zip(*(render_edit(e, size) for e in edits)))
    return EditBatch(sources, targets, masks, edits)


class EditBatchStream(torch.utils.data.IterableDataset):
    """Endless `EditBatch`es for training; with DataLoader workers, each worker draws from its own seed."""

    def __init__(self, batch_size: int, split: str, seed: int = 0, size: int = DEFAULT_SIZE):
        self.batch_size, self.split, self.seed, self.size = batch_size, split, seed, size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info:
            torch.set_num_threads(1)
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            yield sample_edit_batch(rng, self.batch_size, self.split, self.size)
