"""TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers"),
and its confidence-gated variant.

Instead of reusing the last computed residual, forecast it at skipped steps with a
Taylor series whose derivatives are finite differences of the last computed steps.
`TaylorSeer` computes every `interval` steps. `GatedTaylorSeer` always computes the
first block, forecasts it too, and trusts the forecast for the rest of the stack only
while the first block's forecast error stays under `threshold`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..policy import (
    Action,
    BranchMemory,
    Policy,
    State,
    Step,
    StepCacheConfig,
    check_int,
    check_range,
    relative_change,
    taylor_forecast,
)


def _check_order(order: int) -> None:
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")


@dataclass(frozen=True)
class TaylorSeer(StepCacheConfig):
    order: int = 1
    interval: int = 3  # 1 computes every step
    warmup: int = 2

    def __post_init__(self):
        _check_order(self.order)
        check_int("interval", self.interval, 1)
        check_int("warmup", self.warmup, 1)

    def make_policy(self, transformer: nn.Module | None = None) -> Policy:
        return TaylorSeerPolicy(self)


class TaylorSeerPolicy(Policy):
    def __init__(self, config: TaylorSeer):
        self.config = config
        self.order = config.order
        self.history = config.order + 1

    def decide(self, step: Step, segment: int, x: State, memory: BranchMemory) -> Action:
        c = self.config
        return Action.COMPUTE if step.index < c.warmup or (step.index - c.warmup) % c.interval == 0 else Action.FORECAST


@dataclass(frozen=True)
class GatedTaylorSeer(StepCacheConfig):
    order: int = 1
    threshold: float = 0.05  # first-block forecast error (relative L1) under which the stack is forecast; 0: never
    max_interval: int = 4  # at most this many steps between computations of the stack
    warmup: int = 2

    def __post_init__(self):
        _check_order(self.order)
        check_range("threshold", self.threshold, 0.0, 10.0)
        check_int("max_interval", self.max_interval, 1)
        check_int("warmup", self.warmup, 1)

    def make_policy(self, transformer: nn.Module | None = None) -> Policy:
        return GatedTaylorSeerPolicy(self)


class GatedTaylorSeerPolicy(Policy):
    def __init__(self, config: GatedTaylorSeer):
        self.config = config
        self.order = config.order
        self.history = config.order + 2  # the first block keeps one more point: its forecast is checked against now

    def check(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError("GatedTaylorSeer needs at least 2 blocks (the first is the probe)")

    def boundaries(self, num_blocks: int) -> list[int]:
        return [0, 1, num_blocks]

    def decide(self, step: Step, segment: int, x: State, memory: BranchMemory) -> Action:
        if segment == 0:
            return Action.COMPUTE
        c = self.config
        probe = memory.segments[0].history
        last = memory.segments[1].last_step
        if step.index < c.warmup or len(probe) < 3 or step.index - last >= c.max_interval:
            return Action.COMPUTE
        forecast = taylor_forecast(probe[:-1], step.index, self.order)[0]
        return Action.FORECAST if relative_change(forecast, probe[-1][1][0], step.group) < c.threshold else Action.COMPUTE
