"""Temporal Delta Cache, per block (6Bit-Diffusion; with the block-wise view of
Block-wise Adaptive Caching, Cui et al. 2025, and ProfilingDiT, Ma et al. 2025).

Each block on its own: if its input has changed by less than `threshold` (relative L1)
since the step it was last computed at, add the output-minus-input delta cached then
instead of computing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..policy import Action, BranchMemory, Policy, State, Step, StepCacheConfig, check_int, check_range, relative_change


@dataclass(frozen=True)
class TemporalDeltaCache(StepCacheConfig):
    threshold: float = 0.05  # 0 computes every block
    warmup: int = 1
    max_cached_steps: int | None = None  # cap on consecutive cached steps per block

    def __post_init__(self):
        check_range("threshold", self.threshold, 0.0, 10.0)
        check_int("warmup", self.warmup, 1)
        if self.max_cached_steps is not None:
            check_int("max_cached_steps", self.max_cached_steps, 1)

    def make_policy(self, transformer: nn.Module | None = None) -> Policy:
        return TemporalDeltaPolicy(self)


class TemporalDeltaPolicy(Policy):
    keeps_inputs = True

    def __init__(self, config: TemporalDeltaCache):
        self.config = config

    def boundaries(self, num_blocks: int) -> list[int]:
        return list(range(num_blocks + 1))

    def decide(self, step: Step, segment: int, x: State, memory: BranchMemory) -> Action:
        c = self.config
        last = memory.segments[segment].last_step
        if (step.index < c.warmup or (c.max_cached_steps is not None and step.index - last > c.max_cached_steps)
                or relative_change(x[0], memory.segments[segment].input[0], step.group) >= c.threshold):
            return Action.COMPUTE
        return Action.REUSE
