"""First-block cache and its dual-block generalisation DBCache (ParaAttention's FBCache; cache-dit's DBCache).

Always compute the first `fn` blocks. If their residual has changed by less than
`threshold` (relative L1) since the middle blocks were last computed, reuse the middle
blocks' cached residual; always compute the last `bn` blocks, which correct the
approximation. `FirstBlockCache` is the first block alone as the probe (F1B0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..policy import Action, BranchMemory, Policy, State, Step, StepCacheConfig, check_int, check_range, relative_change


def _check(threshold: float, warmup: int, max_cached_steps: int | None) -> None:
    check_range("threshold", threshold, 0.0, 10.0)
    check_int("warmup", warmup, 1)
    if max_cached_steps is not None:
        check_int("max_cached_steps", max_cached_steps, 1)


@dataclass(frozen=True)
class DBCache(StepCacheConfig):
    fn: int = 1  # front blocks always computed
    bn: int = 0  # back blocks always computed
    threshold: float = 0.08  # 0 computes every step
    warmup: int = 1
    max_cached_steps: int | None = None  # cap on consecutive cached steps

    def __post_init__(self):
        check_int("fn", self.fn, 1)
        check_int("bn", self.bn, 0)
        _check(self.threshold, self.warmup, self.max_cached_steps)

    def make_policy(self, transformer: nn.Module | None = None) -> Policy:
        return DBCachePolicy(self.fn, self.bn, self.threshold, self.warmup, self.max_cached_steps)


@dataclass(frozen=True)
class FirstBlockCache(StepCacheConfig):
    threshold: float = 0.08  # 0 computes every step
    warmup: int = 1
    max_cached_steps: int | None = None  # cap on consecutive cached steps

    def __post_init__(self):
        _check(self.threshold, self.warmup, self.max_cached_steps)

    def make_policy(self, transformer: nn.Module | None = None) -> Policy:
        return DBCachePolicy(1, 0, self.threshold, self.warmup, self.max_cached_steps)


@dataclass
class ProbeState:
    probe: torch.Tensor | None = None  # the front blocks' residual when the middle blocks were last computed
    cached_steps: int = 0  # consecutive steps the middle blocks were reused


class DBCachePolicy(Policy):
    def __init__(self, fn: int, bn: int, threshold: float, warmup: int, max_cached_steps: int | None):
        self.fn, self.bn, self.threshold, self.warmup, self.max_cached_steps = fn, bn, threshold, warmup, max_cached_steps

    def new_state(self) -> ProbeState:
        return ProbeState()

    def check(self, num_blocks: int) -> None:
        if self.fn + self.bn >= num_blocks:
            raise ValueError(f"fn + bn = {self.fn + self.bn} leaves no block to cache "
                             f"in a stack of {num_blocks}; it must be below {num_blocks}")

    def boundaries(self, num_blocks: int) -> list[int]:
        return sorted({0, self.fn, num_blocks - self.bn, num_blocks})

    def decide(self, step: Step, segment: int, x: State, memory: BranchMemory) -> Action:
        if segment != 1:
            return Action.COMPUTE
        state: ProbeState = memory.state
        probe = memory.segments[0].history[-1][1][0]
        if (step.index < self.warmup or state.probe is None
                or (self.max_cached_steps is not None and state.cached_steps >= self.max_cached_steps)
                or relative_change(probe, state.probe, step.group) >= self.threshold):
            return Action.COMPUTE
        state.cached_steps += 1
        return Action.REUSE

    def computed(self, step: Step, segment: int, x_in: State, x_out: State, memory: BranchMemory) -> None:
        if segment == 1:
            memory.state.probe = memory.segments[0].history[-1][1][0]
            memory.state.cached_steps = 0
