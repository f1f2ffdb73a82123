"""ShapesWorld: a seeded, procedural world of short RGB clips with captions.

Each clip shows one or two shapes of distinct colours moving over a plain
background, and comes with a caption from a small fixed grammar, e.g.
"a red square moves left on a blue background", plus its attribute labels.
Scene parameters are drawn with numpy's PCG64 generator and rendered in float32
with soft (anti-aliased) edges, so the same seed gives the same clip on any machine.

The train/held-out split is over caption combinations: an object's
(shape, colour, motion, background) tuple is held out when a fixed hash says so,
and a caption is held out when any of its objects is. Models never see a held-out
combination in training; evaluation uses only those.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "magenta": (220, 60, 220),
    "cyan": (60, 220, 230),
    "white": (245, 245, 245),
}
BACKGROUNDS = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "blue": (50, 90, 235),
}
MOTIONS = {
    "left": "moves left",
    "right": "moves right",
    "up": "moves up",
    "down": "moves down",
    "static": "stays still",
    "grow": "grows",
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
MOTION_NAMES = tuple(MOTIONS)
STREAM_MOTIONS = ("left", "right", "up", "down", "static")  # what an endless clip can show

DEFAULT_FRAMES = 8
DEFAULT_SIZE = 32
HELD_OUT_PERCENT = 15
TWO_OBJECT_PROBABILITY = 0.35
SPLITS = ("train", "held_out", "all")

# Geometry, as fractions of the frame size.
_RADIUS_RANGE = (0.13, 0.2)
_TRAVEL = 0.4  # total displacement over a clip
_GROWTH = 1.6  # final radius / initial radius for "grow"
_MIN_SEPARATION = 0.8  # centres stay this many (r1 + r2) apart


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    motion: str

    def phrase(self, with_motion: bool = True) -> str:
        text = f"a {self.colour} {self.shape}"
        return f"{text} {MOTIONS[self.motion]}" if with_motion else text


@dataclass(frozen=True)
class Scene:
    """What a clip shows: its objects (in caption order) and background."""

    objects: tuple[ShapeObject, ...]
    background: str

    def caption(self, with_motion: bool = True) -> str:
        objects = " and ".join(o.phrase(with_motion) for o in self.objects)
        return f"{objects} on a {self.background} background"

    def combinations(self) -> list[tuple[str, str, str, str]]:
        return [(o.shape, o.colour, o.motion, self.background) for o in self.objects]

    def is_held_out(self, with_motion: bool = True) -> bool:
        return any(is_held_out_combination(*c, with_motion=with_motion) for c in self.combinations())


def is_held_out_combination(shape: str, colour: str, motion: str, background: str, with_motion: bool = True) -> bool:
    """Whether an object's attribute combination is reserved for evaluation."""
    key = f"{shape}/{colour}/{motion if with_motion else '-'}/{background}"
    return zlib.crc32(key.encode()) % 100 < HELD_OUT_PERCENT


def vocabulary() -> tuple[str, ...]:
    """Every word the caption grammar can produce, sorted."""
    words = {"a", "and", "on", "background"}
    words.update(SHAPES, COLOURS, BACKGROUNDS)
    for phrase in MOTIONS.values():
        words.update(phrase.split())
    return tuple(sorted(words))


def parse_caption(caption: str) -> Scene:
    """Inverse of `Scene.caption`: the scene a grammatical caption describes.

    Captions without motion words (image captions) parse with motion "static".
    Raises ValueError naming the problem for anything outside the grammar.
    """
    words = caption.lower().split()
    if len(words) < 6 or words[-4:-2] != ["on", "a"] or words[-1] != "background":
        raise ValueError(f"caption {caption!r} must end with 'on a <colour> background'")
    background = words[-2]
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; backgrounds are {', '.join(BACKGROUNDS)}")
    phrases_by_words = {tuple(p.split()): m for m, p in MOTIONS.items()}
    objects = []
    for part in " ".join(words[:-4]).split(" and "):
        tokens = part.split()
        if len(tokens) < 3 or tokens[0] != "a":
            raise ValueError(f"object phrase {part!r} must read 'a <colour> <shape> [<motion>]'")
        colour, shape, motion_words = tokens[1], tokens[2], tuple(tokens[3:])
        if colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r}; colours are {', '.join(COLOURS)}")
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")
        if motion_words and motion_words not in phrases_by_words:
            raise ValueError(f"unknown motion {' '.join(motion_words)!r}; motions are {', '.join(MOTIONS.values())}")
        objects.append(ShapeObject(shape, colour, phrases_by_words.get(motion_words, "static")))
    if len(objects) > 2:
        raise ValueError(f"caption {caption!r} has {len(objects)} objects; at most 2 are allowed")
    return Scene(tuple(objects), background)


def sample_scene(rng: np.random.Generator, split: str = "train", with_motion: bool = True, count: int | None = None,
                 motions: tuple[str, ...] = MOTION_NAMES) -> Scene:
    """Draw a scene whose caption belongs to `split` ("train", "held_out" or "all").

    `count` fixes the number of objects; by default it is 2 with TWO_OBJECT_PROBABILITY.
    `motions`: the motions drawn from (e.g. STREAM_MOTIONS).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    while True:
        count = count or (2 if rng.random() < TWO_OBJECT_PROBABILITY else 1)
        background = BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
        allowed = [c for c in COLOUR_NAMES if c != background]
        colours = sorted(rng.choice(len(allowed), size=count, replace=False))  # caption order = colour order
        objects = tuple(
            ShapeObject(
                SHAPES[rng.integers(len(SHAPES))],
                allowed[c],
                motions[rng.integers(len(motions))] if with_motion else "static",
            )
            for c in colours
        )
        scene = Scene(objects, background)
        if split == "all" or scene.is_held_out(with_motion) == (split == "held_out"):
            return scene


def held_out_scenes(count: int, seed: int = 0, with_motion: bool = True,
                    motions: tuple[str, ...] = MOTION_NAMES) -> list[Scene]:
    """`count` distinct held-out scenes, in a fixed order for a given seed.

    Object counts follow the training mix, although two-object captions are more
    often held out (either object can make them so).
    """
    rng = np.random.default_rng(seed)
    scenes: dict[str, Scene] = {}
    for _ in range(100 * count):
        objects = 2 if rng.random() < TWO_OBJECT_PROBABILITY else 1
        scene = sample_scene(rng, "held_out", with_motion, objects, motions)
        scenes.setdefault(scene.caption(with_motion), scene)
        if len(scenes) == count:
            return list(scenes.values())
    raise ValueError(f"could not find {count} distinct held-out captions")


def _layout(rng: np.random.Generator, scene: Scene, size: int) -> np.ndarray:
    """Per-object (x0, y0, r0, dx, dy, growth) in pixels, keeping shapes in frame and apart."""
    for _ in range(100):
        rows = []
        for obj in scene.objects:
            r = rng.uniform(*_RADIUS_RANGE) * size
            growth = _GROWTH if obj.motion == "grow" else 1.0
            dx = {"left": -_TRAVEL, "right": _TRAVEL}.get(obj.motion, 0.0) * size
            dy = {"up": -_TRAVEL, "down": _TRAVEL}.get(obj.motion, 0.0) * size
            margin = r * growth
            x0 = rng.uniform(margin + max(0.0, -dx), size - margin - max(0.0, dx))
            y0 = rng.uniform(margin + max(0.0, -dy), size - margin - max(0.0, dy))
            rows.append((x0, y0, r, dx, dy, growth))
        layout = np.array(rows)
        if len(rows) == 1 or _far_apart(layout):
            return layout
    return layout


def _far_apart(layout: np.ndarray) -> bool:
    a, b = layout
    for s in np.linspace(0, 1, 5):
        distance = np.hypot(a[0] + s * a[3] - b[0] - s * b[3], a[1] + s * a[4] - b[1] - s * b[4])
        if distance < _MIN_SEPARATION * (a[2] * (1 + s * (a[5] - 1)) + b[2] * (1 + s * (b[5] - 1))):
            return False
    return True


def render(scene: Scene, layout: np.ndarray, num_frames: int, size: int) -> torch.Tensor:
    """Render a scene to a float32 clip (T, 3, H, W) in [0, 1]."""
    s = torch.linspace(0, 1, num_frames) if num_frames > 1 else torch.zeros(1)
    return _draw(scene, torch.as_tensor(layout, dtype=torch.float32), s, size, wrap=False)


def _draw(scene: Scene, p: torch.Tensor, s: torch.Tensor, size: int, wrap: bool) -> torch.Tensor:
    """The scene at clip times s (T,), 0 the layout's start and 1 a clip's travel later; `wrap`: on a torus."""
    num_frames = len(s)
    cx = p[:, 0:1] + s * p[:, 3:4]  # (objects, T)
    cy = p[:, 1:2] + s * p[:, 4:5]
    r = p[:, 2:3] * (1 + s * (p[:, 5:6] - 1))
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dx = grid.view(1, 1, 1, -1) - cx[..., None, None]  # (objects, T, 1, W)
    dy = grid.view(1, 1, -1, 1) - cy[..., None, None]  # (objects, T, H, 1)
    if wrap:  # the nearest copy of each object on the torus
        dx, dy = (dx + size / 2) % size - size / 2, (dy + size / 2) % size - size / 2
    r = r[..., None, None]
    clip = torch.tensor(BACKGROUNDS[scene.background], dtype=torch.float32).view(1, 3, 1, 1) / 255
    clip = clip.expand(num_frames, 3, size, size)
    for i, obj in enumerate(scene.objects):
        covered = coverage(obj.shape, dx[i], dy[i], r[i]).unsqueeze(1)  # (T, 1, H, W)
        colour = torch.tensor(COLOURS[obj.colour], dtype=torch.float32).view(1, 3, 1, 1) / 255
        clip = clip * (1 - covered) + colour * covered
    return clip


def coverage(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """How much of each pixel a shape of radius r covers (soft edges, in [0, 1]), from each pixel centre's offset
    (dx, dy) from the shape's centre; the three broadcast together."""
    if shape == "circle":
        d = torch.sqrt(dx ** 2 + dy ** 2) - r
    elif shape == "square":
        d = torch.maximum(dx.abs(), dy.abs()) - r
    else:  # triangle, apex up: base at cy + r, half-width r at the base
        from_apex = dy + r
        d = torch.maximum(dy - r, (dx.abs() - from_apex / 2) / 1.118034)
    return (0.5 - d).clamp(0, 1)


def render_stream(scene: Scene, layout: np.ndarray, first_frame: int, num_frames: int, size: int) -> torch.Tensor:
    """Frames [first_frame, first_frame + num_frames) of the endless clip of a scene (T, 3, H, W) in [0, 1].

    Objects move at a clip's pace (its travel every DEFAULT_FRAMES frames) for ever, leaving
    the frame on one side and coming back on the other: a wall would reverse them and make
    their caption false. Nothing grows (growth cannot go on), so streams use STREAM_MOTIONS.
    """
    if any(o.motion not in STREAM_MOTIONS for o in scene.objects):
        raise ValueError(f"an endless clip cannot show {scene.caption()!r}: streams use the motions {STREAM_MOTIONS}")
    s = (torch.arange(first_frame, first_frame + num_frames, dtype=torch.float32) / (DEFAULT_FRAMES - 1))
    return _draw(scene, torch.as_tensor(layout, dtype=torch.float32), s, size, wrap=True)


def make_clip(scene: Scene, seed: int, num_frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE) -> torch.Tensor:
    """The clip (T, 3, H, W) in [0, 1] of `scene`, placed by `seed`."""
    return render(scene, _layout(np.random.default_rng(seed), scene, size), num_frames, size)


@dataclass
class Batch:
    clips: torch.Tensor  # (B, T, 3, H, W) in [0, 1]
    scenes: list[Scene]

    def captions(self, with_motion: bool = True) -> list[str]:
        return [s.caption(with_motion) for s in self.scenes]


def sample_batch(
    rng: np.random.Generator,
    batch_size: int,
    split: str = "train",
    num_frames: int = DEFAULT_FRAMES,
    size: int = DEFAULT_SIZE,
    with_motion: bool = True,
    endless: bool = False,
) -> Batch:
    """A batch of random clips from `split`, all drawn from `rng`; `endless`: stretches of endless clips
    (`render_stream`), starting anywhere."""
    if endless:
        scenes = [sample_scene(rng, split, with_motion, motions=STREAM_MOTIONS) for _ in range(batch_size)]
        clips = [render_stream(s, stream_layout(rng, s, size), 0, num_frames, size) for s in scenes]
    else:
        scenes = [sample_scene(rng, split, with_motion) for _ in range(batch_size)]
        clips = [render(s, _layout(rng, s, size), num_frames, size) for s in scenes]
    return Batch(torch.stack(clips), scenes)


def stream_layout(rng: np.random.Generator, scene: Scene, size: int) -> np.ndarray:
    """An endless clip's start: anywhere on the torus (objects apart at the start), moving at a clip's pace."""
    layout = _layout(rng, scene, size)
    layout[:, :2] = (layout[:, :2] + rng.uniform(0, size, 2)) % size  # one shift for all: keeps them apart
    return layout


class BatchStream(torch.utils.data.IterableDataset):
    """Endless `Batch`es for training; with DataLoader workers, each worker draws from its own seed.

    `num_frames` may be several lengths: each batch then has one of them, drawn uniformly.
    """

    def __init__(self, batch_size: int, split: str, num_frames: int | tuple[int, ...] = DEFAULT_FRAMES,
                 with_motion: bool = True, seed: int = 0, endless: bool = False):
        lengths = (num_frames,) if isinstance(num_frames, int) else tuple(num_frames)
        self.batch_size, self.split, self.lengths, self.with_motion, self.seed = batch_size, split, lengths, with_motion, seed
        self.endless = endless

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info:
            torch.set_num_threads(1)  # many workers with a thread pool each would starve the training process
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            frames = int(rng.choice(self.lengths))
            yield sample_batch(rng, self.batch_size, self.split, frames, with_motion=self.with_motion, endless=self.endless)
