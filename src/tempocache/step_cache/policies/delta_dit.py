"""Δ-DiT (Chen et al. 2024, "Δ-DiT: A Training-Free Acceleration Method Tailored for Diffusion Transformers").

Front blocks shape the outline, rear blocks the detail. While the sampler is still in
its first `boundary` fraction of steps, cache the rear blocks' residual (reuse it for
`interval - 1` steps); after that, cache the front blocks' residual instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..policy import Action, BranchMemory, Policy, State, Step, StepCacheConfig, check_int, check_range


@dataclass(frozen=True)
class DeltaDiT(StepCacheConfig):
    interval: int = 2  # 1 computes every step
    boundary: float = 0.5  # fraction of the steps during which the rear blocks are cached
    split: int | None = None  # first rear block; None: the middle of the stack
    warmup: int = 1
    num_steps: int | None = None  # only needed when the pipeline does not tell

    def __post_init__(self):
        check_int("interval", self.interval, 1)
        check_range("boundary", self.boundary, 0.0, 1.0)
        check_int("warmup", self.warmup, 1)
        if self.split is not None:
            check_int("split", self.split, 1)
        if self.num_steps is not None:
            check_int("num_steps", self.num_steps, 1)

    def make_policy(self, transformer: nn.Module | None = None) -> Policy:
        return DeltaDiTPolicy(self)


class DeltaDiTPolicy(Policy):
    def __init__(self, config: DeltaDiT):
        self.config = config
        self.num_steps = config.num_steps

    def check(self, num_blocks: int) -> None:
        if self.config.split is not None and self.config.split >= num_blocks:
            raise ValueError(f"split={self.config.split} must be below the block count ({num_blocks})")

    def boundaries(self, num_blocks: int) -> list[int]:
        return [0, self.config.split or num_blocks // 2, num_blocks]

    def check_step(self, step: Step) -> None:
        step.require_num_steps("DeltaDiT", alternative=", or set DeltaDiT(num_steps=...)")

    def decide(self, step: Step, segment: int, x: State, memory: BranchMemory) -> Action:
        c = self.config
        if step.index < c.warmup or (step.index - c.warmup) % c.interval == 0:
            return Action.COMPUTE
        outline_phase = step.index < c.boundary * step.num_steps
        cached_segment = 1 if outline_phase else 0
        return Action.REUSE if segment == cached_segment else Action.COMPUTE
