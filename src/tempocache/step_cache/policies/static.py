"""Static interval caching (FORA, Selvaraju et al. 2024; DeepCache, Ma et al. 2024).

Compute the whole block stack every `interval` steps and reuse its residual in between;
the first `warmup` steps are always computed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..policy import Action, BranchMemory, Policy, State, Step, StepCacheConfig, check_int


@dataclass(frozen=True)
class StaticCache(StepCacheConfig):
    interval: int = 2  # 1 computes every step
    warmup: int = 1

    def __post_init__(self):
        check_int("interval", self.interval, 1)
        check_int("warmup", self.warmup, 1)

    def make_policy(self, transformer: nn.Module | None = None) -> Policy:
        return StaticPolicy(self)


class StaticPolicy(Policy):
    def __init__(self, config: StaticCache):
        self.config = config

    def decide(self, step: Step, segment: int, x: State, memory: BranchMemory) -> Action:
        c = self.config
        return Action.COMPUTE if step.index < c.warmup or (step.index - c.warmup) % c.interval == 0 else Action.REUSE
