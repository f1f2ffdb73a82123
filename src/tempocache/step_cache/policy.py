"""What every step-cache policy shares: its config's base type, the actions, what it knows about a step,
what it remembers.

A policy splits the block stack into contiguous *segments* and, at every step, for
every segment, decides to compute it, reuse its cached residual (output minus input),
or forecast the residual from the last computed ones. The engine does the rest.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed import ProcessGroup

from ..models import State, summed


class Action(enum.Enum):
    COMPUTE = "compute"
    REUSE = "reuse"
    FORECAST = "forecast"


@dataclass(frozen=True)
class Step:
    index: int  # denoising step of this generation, from 0
    num_steps: int | None  # steps in this generation, when the pipeline tells (or the config says)
    timestep: float
    branch: str  # "cond", "uncond", ... (the pipeline's cache_context name, else the call's order at this timestep)
    steps_unknown: str = ""  # why the step count is unknown where a pipeline should have told it
    group: ProcessGroup | None = None  # the ranks this call's sequence is split over (context parallelism)

    def require_num_steps(self, policy: str, alternative: str = "") -> int:
        if self.num_steps is None:
            why = f" ({self.steps_unknown})" if self.steps_unknown else ""
            raise ValueError(f"{policy} needs the number of denoising steps{why}: enable tempocache on the pipeline "
                             "that runs the generation (its scheduler tells), or call the transformer inside "
                             f"tempocache.models.cache_context(transformer, name, num_inference_steps=...){alternative}")
        return self.num_steps


@dataclass
class SegmentMemory:
    history: list[tuple[int, State]] = field(default_factory=list)  # (step, residual) at its last computations, oldest first
    input: State | None = None  # its input when last computed (for policies that compare inputs)

    @property
    def last_step(self) -> int | None:
        return self.history[-1][0] if self.history else None


@dataclass
class NoState:
    """The per-branch state of a policy that keeps none."""


@dataclass
class BranchMemory:
    """Everything remembered for one CFG branch of one generation: the engine's segments, the policy's state."""

    segments: list[SegmentMemory]
    state: object = field(default_factory=NoState)  # the policy's own, from Policy.new_state()
    actions: dict[int, Action] = field(default_factory=dict)  # this step's decision per segment
    segment_input: State | None = None  # input of the segment being computed
    temb: torch.Tensor | None = None  # the timestep embedding the first block got at this step
    index: int = -1
    timestep: float | None = None
    shape: tuple | None = None

    def nbytes(self) -> int:
        tensors = [t for m in self.segments for _, r in m.history for t in r]
        tensors += [t for m in self.segments if m.input for t in m.input]
        tensors += _tensors([getattr(self.state, f.name) for f in dataclasses.fields(self.state)])
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _tensors(values) -> list[torch.Tensor]:
    """The tensors among `values`, looking inside tuples, lists and transformer outputs."""
    found = []
    for v in values:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (tuple, list)):
            found += _tensors(v)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            found += _tensors(getattr(v, f.name) for f in dataclasses.fields(v))
    return found


def add(a: State, b: State) -> State:
    return tuple(None if x is None or y is None else x + y for x, y in zip(a, b))


def sub(a: State, b: State) -> State:
    return tuple(None if x is None or y is None else x - y for x, y in zip(a, b))


def relative_change(a: torch.Tensor, b: torch.Tensor, group: ProcessGroup | None = None) -> float:
    """mean|a - b| / mean|b|; over every rank's shard of a and b where `group` splits them (`Step.group`)."""
    if group is None:
        return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))
    difference, size = summed(torch.stack([(a - b).abs().sum(), b.abs().sum()]), group)
    return float(difference / size.clamp_min(1e-12))


def taylor_forecast(history: list[tuple[int, State]], step: int, order: int) -> State:
    """Extrapolate residuals to `step` with the polynomial through the last order + 1 computed ones (Newton form).

    At order 1 this is TaylorSeer's first-order series; at order 2 it is the quadratic
    through the three points rather than TaylorSeer's truncated series (see
    docs/step_cache/taylorseer.md). Divided differences handle uneven spacing.
    """
    points = history[-(order + 1):]
    steps = [s for s, _ in points]
    coefficients = [r for _, r in points]  # divided differences, computed in place
    for level in range(1, len(points)):
        for i in range(len(points) - 1, level - 1, -1):
            span = steps[i] - steps[i - level]
            coefficients[i] = tuple(None if a is None else (a - b) / span for a, b in zip(coefficients[i], coefficients[i - 1]))
    result = coefficients[-1]
    for i in range(len(points) - 2, -1, -1):  # Horner
        result = tuple(None if r is None else c + r * (step - steps[i]) for c, r in zip(coefficients[i], result))
    return result


class Policy:
    """Base class: computes everything. Subclasses override what they need."""

    history = 1  # residuals kept per segment
    order = 1  # of forecasts
    keeps_inputs = False  # whether segment inputs are kept too
    num_steps: int | None = None  # steps per generation, for pipelines that do not tell

    def new_state(self) -> object:
        """This policy's state for one CFG branch of one generation: a dataclass instance."""
        return NoState()

    def boundaries(self, num_blocks: int) -> list[int]:
        """Segment edges, from 0 to num_blocks."""
        return [0, num_blocks]

    def check(self, num_blocks: int) -> None:
        """Raise ValueError if the policy cannot run on a stack of this many blocks."""

    def decide(self, step: Step, segment: int, x: State, memory: BranchMemory) -> Action:
        return Action.COMPUTE

    def approximate(self, step: Step, segment: int, action: Action, memory: BranchMemory) -> State:
        history = memory.segments[segment].history
        if action is Action.FORECAST and len(history) > 1:
            return taylor_forecast(history, step.index, self.order)
        return history[-1][1]

    def computed(self, step: Step, segment: int, x_in: State, x_out: State, memory: BranchMemory) -> None:
        """Called after a segment was computed."""

    def check_step(self, step: Step) -> None:
        """Raise ValueError, before the call runs, if the policy cannot handle this step."""

    def call_output(self, step: Step, branches: dict[str, BranchMemory]):
        """An output standing in for the whole transformer call, or None to run it."""
        return None

    def call_done(self, step: Step, branches: dict[str, BranchMemory], output) -> None:
        """Called after a transformer call ran."""


@dataclass(frozen=True)
class StepCacheConfig:
    """Base of every step-cache config: frozen settings, checked when made, and the policy that enacts them."""

    def make_policy(self, transformer: nn.Module) -> Policy:
        raise NotImplementedError(f"{type(self).__name__} must define make_policy(transformer)")


def check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if not number or not (low < value if low_open else low <= value) or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")


def check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
