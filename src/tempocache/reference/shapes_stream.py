"""ShapesStream: long seeded ShapesWorld streams with an event log, and questions about them.

A stream is `frames` frames of 32x32 RGB. Up to three objects of distinct shapes are in view at
a time; they move and bounce off the walls and off each other. Every so often one thing happens,
and the event log records it: an object enters through an edge or leaves through one, changes
colour, starts or stops moving, or the background changes. A question is asked at a frame t_q
about evidence at an earlier frame t_e, and its answer is one word of a closed vocabulary:

    colour_before   "what colour was the square before it turned blue"     red       (t_e: the change)
    entered_first   "which shape entered first"                             triangle  (t_e: that entry)
    count_left      "how many objects have left"                            two       (t_e: the first exit)
    background_when "what was the background when the circle appeared"     gray      (t_e: that entry)

A question is only asked where its answer is unique in the log up to t_q (one such change, one
such entry). Questions are bucketed by distance t_q - t_e against a window of frames: inside it,
beyond it (up to four windows) and far beyond. `questions` draws each type's answers uniformly; `balance`
evens them out over a set of questions.

The split is over (shape, colour) combinations, as ShapesWorld's captions are: training streams
never show a held-out combination; a held-out stream shows at least one, and its questions about
one object are asked only of objects that take a held-out combination at some time.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .shapesworld import BACKGROUNDS, COLOURS, DEFAULT_SIZE, SHAPES, coverage

KINDS = ("enter", "leave", "recolour", "start", "stop", "background")
QUESTION_TYPES = ("colour_before", "entered_first", "count_left", "background_when")
COUNTS = ("one", "two", "three")  # count_left's answers; more exits than three are not asked about
BUCKETS = ("inside", "beyond", "far")
WINDOW_FRAMES = 64  # the distance buckets' window: a sinks + window cache of this many frames
HELD_OUT_PERCENT = 15
MAX_OBJECTS = 3
RADIUS = 4.5  # pixels, at 32x32
SPEED = 0.75  # pixels a frame, along each moving axis
MEAN_GAP = 40  # frames between events, on average
_COLOUR_NAMES, _BACKGROUND_NAMES = tuple(COLOURS), tuple(BACKGROUNDS)
_EDGES = ("left", "right", "top", "bottom")
_TEMPLATES = {
    "colour_before": "what colour was the {shape} before it turned {colour}",
    "entered_first": "which shape entered first",
    "count_left": "how many objects have left",
    "background_when": "what was the background when the {shape} appeared",
}


def is_held_out(shape: str, colour: str) -> bool:
    """Whether an object's (shape, colour) is reserved for evaluation."""
    return zlib.crc32(f"stream/{shape}/{colour}".encode()) % 100 < HELD_OUT_PERCENT


def vocabulary() -> tuple[str, ...]:
    """Every word of the questions and the answers, sorted."""
    words = {w for t in _TEMPLATES.values() for w in t.split() if not w.startswith("{")}
    return tuple(sorted(words | set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(COUNTS)))


def question_type(text: str) -> str:
    """Which of QUESTION_TYPES a question's words are (a trailing "?" allowed)."""
    words = text.rstrip("?").split()
    for kind, template in _TEMPLATES.items():
        pattern = template.split()
        if len(words) == len(pattern) and all(p == w or p == "{shape}" and w in SHAPES or
                                              p == "{colour}" and w in COLOURS for p, w in zip(pattern, words)):
            return kind
    raise ValueError(f"{text!r} is not one of the questions asked about ShapesStream: "
                     + "; ".join(f"{t!r}" for t in _TEMPLATES.values()))


def answers(kind: str) -> tuple[str, ...]:
    """The closed set of answers to a question type."""
    return {"colour_before": _COLOUR_NAMES, "entered_first": SHAPES, "count_left": COUNTS,
            "background_when": _BACKGROUND_NAMES}[kind]


@dataclass(frozen=True)
class Event:
    frame: int  # the first frame that shows it (an exit: the first without the object)
    kind: str  # one of KINDS
    shape: str | None = None  # the object's (None for the background)
    before: str | None = None  # colour or background before a change; the edge of an entry or exit
    after: str | None = None  # colour or background after it


@dataclass(frozen=True)
class Question:
    kind: str  # one of QUESTION_TYPES
    text: str
    answer: str
    asked: int  # t_q: asked after this many frames
    evidence: int  # t_e: the frame of the evidence
    shape: str | None = None  # the object asked about, if any

    def bucket(self, window: int = WINDOW_FRAMES) -> str:
        distance = self.asked - self.evidence
        return "inside" if distance < window else "beyond" if distance < 4 * window else "far"


@dataclass
class _Object:
    shape: str
    colour: str
    x: float
    y: float
    vx: float
    vy: float
    exit: str | None = None  # the edge it is leaving through
    entering: bool = False

    @property
    def moving(self) -> bool:
        return self.vx != 0 or self.vy != 0


class ShapesStream:
    """A seeded stream of `frames` frames: its event log, the state of every frame, frames rendered on demand."""

    def __init__(self, seed: int, frames: int, split: str = "train", size: int = DEFAULT_SIZE):
        if frames < 1:
            raise ValueError(f"a stream has at least one frame, got {frames}")
        if split not in ("train", "held_out"):
            raise ValueError(f"unknown split {split!r}; accepted: train, held_out")
        self.seed, self.frames, self.split, self.size = seed, frames, split, size
        for attempt in range(100):
            rng = np.random.default_rng([seed, attempt, split == "held_out"])
            events, states = _simulate(rng, frames, size, split)
            shown = {(shape, colour) for state in states for shape, colour, *_ in state["objects"]}
            if split == "train" or any(is_held_out(*c) for c in shown):
                break
        else:
            raise RuntimeError(f"no held-out stream of {frames} frames from seed {seed}")
        self.events, self.states = events, states

    def render(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Frames [start, stop) as float32 (T, 3, H, W) in [0, 1]."""
        stop = self.frames if stop is None else stop
        if not 0 <= start <= stop <= self.frames:
            raise ValueError(f"frames [{start}, {stop}) are not in a stream of {self.frames}")
        grid = torch.arange(self.size, dtype=torch.float32) + 0.5
        out = torch.empty(stop - start, 3, self.size, self.size)
        for i, state in enumerate(self.states[start:stop]):
            frame = torch.tensor(BACKGROUNDS[state["background"]], dtype=torch.float32).view(3, 1, 1) / 255
            frame = frame.expand(3, self.size, self.size)
            for shape, colour, x, y in state["objects"]:
                covered = coverage(shape, grid.view(1, -1) - x, grid.view(-1, 1) - y, torch.tensor(RADIUS))
                frame = frame * (1 - covered) + torch.tensor(COLOURS[colour]).view(3, 1, 1) / 255 * covered
            out[i] = frame
        return out

    @cached_property
    def held_out_shapes(self) -> frozenset[str]:
        """The shapes that take a held-out (shape, colour) at some frame."""
        return frozenset(s for state in self.states for s, c, *_ in state["objects"] if is_held_out(s, c))

    def candidates(self, asked: int) -> list[Question]:
        """Every question with a unique answer that can be asked after `asked` frames (1 to the stream's length)."""
        if not 1 <= asked <= self.frames:
            raise ValueError(f"a question is asked after 1 to {self.frames} frames, got {asked}")
        seen = [e for e in self.events if e.frame < asked]
        found = []
        entries = [e for e in seen if e.kind == "enter"]
        if entries:
            first = entries[0]
            found.append(Question("entered_first", _TEMPLATES["entered_first"], first.shape, asked, first.frame))
        exits = [e for e in seen if e.kind == "leave"]
        if 1 <= len(exits) <= len(COUNTS):
            found.append(Question("count_left", _TEMPLATES["count_left"], COUNTS[len(exits) - 1], asked, exits[0].frame))
        for e in seen:
            if e.kind == "recolour" and sum(o.kind == "recolour" and (o.shape, o.after) == (e.shape, e.after)
                                            for o in seen) == 1:
                text = _TEMPLATES["colour_before"].format(shape=e.shape, colour=e.after)
                found.append(Question("colour_before", text, e.before, asked, e.frame, e.shape))
            if e.kind == "enter" and sum(o.kind == "enter" and o.shape == e.shape for o in seen) == 1:
                text = _TEMPLATES["background_when"].format(shape=e.shape)
                found.append(Question("background_when", text, self.states[e.frame]["background"], asked, e.frame,
                                      e.shape))
        if self.split == "held_out":
            found = [q for q in found if q.shape is None or q.shape in self.held_out_shapes]
        return found

    def questions(self, count: int, seed: int = 0, window: int = WINDOW_FRAMES, tries: int = 50) -> list[Question]:
        """Up to `count` questions, the types drawn in turn, each with an answer drawn uniformly from its type's and a
        distance bucket drawn uniformly (against `window`): an event that can be its evidence, then a frame at that
        distance after it at which the question has that answer (`tries` draws per question)."""
        rng = np.random.default_rng([self.seed, seed])
        evidence = {"colour_before": "recolour", "entered_first": "enter", "count_left": "leave",
                    "background_when": "enter"}
        picked: list[Question] = []
        for attempt in range(count * tries):
            if len(picked) == count:
                break
            kind = QUESTION_TYPES[attempt % len(QUESTION_TYPES)]
            answer, bucket = str(rng.choice(answers(kind))), int(rng.integers(len(BUCKETS)))
            events = [e for e in self.events if e.kind == evidence[kind]]
            if not events:
                continue
            event = events[0] if kind == "count_left" else events[int(rng.integers(len(events)))]
            low, high = (np.array((1, window, 4 * window, self.frames))[bucket:bucket + 2] + event.frame).tolist()
            if kind == "count_left":  # asked after the answer's count of exits and before the next
                left = COUNTS.index(answer) + 1
                if left > len(events):
                    continue
                later = events[left].frame + 1 if left < len(events) else self.frames + 1
                low, high = max(low, events[left - 1].frame + 1), min(high, later)
            if low >= min(high, self.frames + 1):
                continue
            asked = int(rng.integers(low, min(high, self.frames + 1)))
            pool = [q for q in self.candidates(asked)
                    if (q.kind, q.answer, q.evidence) == (kind, answer, event.frame) and q not in picked]
            if pool:
                picked.append(pool[int(rng.integers(len(pool)))])
        return picked


def balance(questions: list[Question], seed: int = 0) -> list[int]:
    """Which of the questions to keep (their indices, in order) so that each type has as many of each of its answers
    as of its rarest (the rest dropped at random; none of a type one of whose answers is missing): then always
    guessing a type's likeliest answer scores chance."""
    rng, kept = np.random.default_rng(seed), []
    for kind in QUESTION_TYPES:
        by_answer: dict[str, list[int]] = {a: [] for a in answers(kind)}
        for i, q in enumerate(questions):
            if q.kind == kind:
                by_answer[q.answer].append(i)
        least = min(map(len, by_answer.values()))
        kept += [i for group in by_answer.values() for i in rng.choice(group, least, replace=False).tolist()]
    return sorted(kept)


class Accuracy:
    """Right answers and questions counted overall, by type, by distance bucket and by both."""

    def __init__(self):
        self.right: Counter[str] = Counter()
        self.total: Counter[str] = Counter()

    def add(self, kind: str, bucket: str, correct: bool) -> None:
        for key in ("all", kind, bucket, f"{kind}/{bucket}"):
            self.right[key] += correct
            self.total[key] += 1

    def summary(self) -> dict:
        return {"accuracy": {k: self.right[k] / self.total[k] for k in sorted(self.total)},
                "questions": dict(sorted(self.total.items()))}


def held_out_questions(streams: int, frames: int, questions: int = 32, seed: int = 0
                       ) -> list[tuple[ShapesStream, list[Question]]]:
    """Held-out streams, each with its questions in the order asked, `balance`d over all of them."""
    listed = [ShapesStream(10_000_019 + seed * streams + i, frames, "held_out") for i in range(streams)]
    pairs = [(stream, q) for stream in listed for q in stream.questions(questions)]
    kept = [pairs[i] for i in balance([q for _, q in pairs], seed=seed)]
    return [(s, sorted((q for t, q in kept if t is s), key=lambda q: q.asked)) for s in listed]


def _simulate(rng: np.random.Generator, frames: int, size: int, split: str) -> tuple[list[Event], list[dict]]:
    """The event log and every frame's state ({"background", "objects": [(shape, colour, x, y)]}) of one stream."""
    background = str(rng.choice(_BACKGROUND_NAMES))
    objects: list[_Object] = []
    events: list[Event] = []
    states: list[dict] = []
    next_event = int(rng.integers(1, MEAN_GAP))
    for frame in range(frames):
        if frame == next_event:
            event = _happen(rng, objects, background, size, split, frame)
            if event is not None:
                events.append(event)
                if event.kind == "background":
                    background = event.after
            next_event = frame + 1 + int(rng.exponential(MEAN_GAP))
        _move(objects, size)
        for gone in [o for o in objects if o.exit and _outside(o, size)]:
            objects.remove(gone)
            events.append(Event(frame, "leave", gone.shape, gone.exit))
        states.append({"background": background, "objects": [(o.shape, o.colour, o.x, o.y) for o in objects]})
    return events, states


def _happen(rng, objects: list[_Object], background: str, size: int, split: str, frame: int) -> Event | None:
    """One random event that the world allows now (None if the one drawn does not)."""
    settled = [o for o in objects if not o.exit and not o.entering]
    weights = np.array([3.0 if kind == "enter" and len(objects) < 2 else 1.0 for kind in KINDS])  # a fuller view
    kind = str(rng.choice(KINDS, p=weights / weights.sum()))
    if kind == "enter" and len(objects) < MAX_OBJECTS:
        shape = str(rng.choice([s for s in SHAPES if s not in {o.shape for o in objects}]))
        colours = _colours(shape, background, split, {o.colour for o in objects})
        edge = str(rng.choice(_EDGES))
        obj = _entering(rng, shape, str(rng.choice(colours)) if colours else "", edge, size)
        lane = [(obj.x + obj.vx / SPEED * d, obj.y + obj.vy / SPEED * d) for d in np.linspace(0, 4 * RADIUS, 9)]
        if colours and all(np.hypot(x - o.x, y - o.y) > 2 * RADIUS + 2 for x, y in lane for o in objects):
            objects.append(obj)
            return Event(frame, "enter", shape, edge)
    if kind == "leave" and settled:
        obj = settled[int(rng.integers(len(settled)))]
        obj.exit = _EDGES[int(np.argmin((obj.x, size - obj.x, obj.y, size - obj.y)))]  # the nearest
        obj.vx, obj.vy = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}[obj.exit]
        return None  # logged when it is out of view
    if kind == "recolour" and settled:
        obj = settled[int(rng.integers(len(settled)))]
        colours = _colours(obj.shape, background, split, {o.colour for o in objects})
        if colours:
            before, obj.colour = obj.colour, str(rng.choice(colours))
            return Event(frame, "recolour", obj.shape, before, obj.colour)
    if kind in ("start", "stop") and settled:
        pool = [o for o in settled if o.moving == (kind == "stop")]
        if pool:
            obj = pool[int(rng.integers(len(pool)))]
            obj.vx, obj.vy = (0.0, 0.0) if kind == "stop" else _velocity(rng)
            return Event(frame, kind, obj.shape)
    if kind == "background":
        pool = [b for b in _BACKGROUND_NAMES if b != background and BACKGROUNDS[b] not in
                {COLOURS[o.colour] for o in objects}]
        if pool:
            return Event(frame, "background", None, background, str(rng.choice(pool)))
    return None


def _colours(shape: str, background: str, split: str, taken: set[str]) -> list[str]:
    """The colours an object of `shape` may take: seen on the background, not another object's, within the split."""
    return [c for c in _COLOUR_NAMES if COLOURS[c] != BACKGROUNDS[background] and c not in taken
            and (split == "held_out" or not is_held_out(shape, c))]


def _velocity(rng: np.random.Generator) -> tuple[float, float]:
    return tuple(float(rng.choice((-SPEED, SPEED))) for _ in range(2))


def _entering(rng, shape: str, colour: str, edge: str, size: int) -> _Object:
    """An object just outside `edge`, heading in."""
    along = float(rng.uniform(2 * RADIUS, size - 2 * RADIUS))
    start = {"left": (-RADIUS, along), "right": (size + RADIUS, along), "top": (along, -RADIUS),
             "bottom": (along, size + RADIUS)}[edge]
    inward = {"left": (SPEED, 0.0), "right": (-SPEED, 0.0), "top": (0.0, SPEED), "bottom": (0.0, -SPEED)}[edge]
    return _Object(shape, colour, *start, *inward, entering=True)


def _outside(obj: _Object, size: int) -> bool:
    return not (-RADIUS < obj.x < size + RADIUS and -RADIUS < obj.y < size + RADIUS)


def _move(objects: list[_Object], size: int) -> None:
    """One frame of motion. An object in view bounces off the walls, and turns back rather than move into another;
    one entering or leaving goes straight on (the way in was clear when it came)."""
    for obj in objects:
        if obj.exit or obj.entering:
            obj.x, obj.y = obj.x + obj.vx, obj.y + obj.vy
            inside = RADIUS + 1 <= obj.x <= size - RADIUS - 1 and RADIUS + 1 <= obj.y <= size - RADIUS - 1
            obj.entering = obj.entering and not inside
            continue
        x, y = obj.x + obj.vx, obj.y + obj.vy
        if any(np.hypot(x - o.x, y - o.y) < 2 * RADIUS + 1 for o in objects if o is not obj):
            obj.vx, obj.vy = -obj.vx, -obj.vy
            continue
        if not RADIUS <= x <= size - RADIUS:
            obj.vx, x = -obj.vx, float(np.clip(x, RADIUS, size - RADIUS))
        if not RADIUS <= y <= size - RADIUS:
            obj.vy, y = -obj.vy, float(np.clip(y, RADIUS, size - RADIUS))
        obj.x, obj.y = x, y
