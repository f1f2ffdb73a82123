"""ERTACache-style error-corrected reuse (Gao et al. 2025, "ERTACache: Error Rectification and Timesteps
Adjustment for Efficient Diffusion").

Offline, from the model's profile: choose the steps whose whole-stack residual is best
approximated by the last computed one (greedily, least weighted error first, until only
`budget` of the steps are computed). Online, at a reused step, scale the cached residual
by the least-squares gain the profile measured between those two steps: a closed-form
linear correction of the cache-induced error. (The paper's sampler step adjustment is
not applied: the pipeline's scheduler is left alone.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from ..policy import Action, BranchMemory, Policy, State, Step, StepCacheConfig, check_int, check_range
from ..profile import Profile, ProfileArg, require_profile


@dataclass(frozen=True)
class ERTACache(StepCacheConfig):
    budget: float = 0.5  # fraction of the steps computed; 1.0 computes every step
    profile: ProfileArg = None  # None: the registered profile of this model
    warmup: int = 2
    correct: bool = True  # apply the linear correction

    def __post_init__(self):
        check_range("budget", self.budget, 0.0, 1.0, low_open=True)
        check_int("warmup", self.warmup, 1)

    def make_policy(self, transformer: nn.Module | None = None) -> Policy:
        profile = require_profile(self.profile, transformer, "ERTACache")
        return ERTAPolicy(self, profile, reuse_steps(profile, self.budget, self.warmup))


def reuse_steps(profile: Profile, budget: float, warmup: int) -> set[int]:
    error = np.array(profile.stack_reuse_error) * profile.step_weights()[:, None]
    steps = profile.num_steps
    reused: set[int] = set()
    while steps - len(reused) > budget * steps + 1e-9:
        computed = [s for s in range(steps) if s not in reused]
        candidates = [(error[s, max(c for c in computed if c < s)], s) for s in computed if s >= warmup]
        if not candidates:
            break
        reused.add(min(candidates)[1])
    return reused


class ERTAPolicy(Policy):
    def __init__(self, config: ERTACache, profile: Profile, reused: set[int]):
        self.config = config
        self.profile = profile
        self.reused = reused

    def check_step(self, step: Step) -> None:
        if step.steps_unknown:
            step.require_num_steps("ERTACache")
        self.profile.check_steps(step.num_steps or max(self.profile.num_steps, step.index + 1), "ERTACache")  # unknown: assume the profile's

    def decide(self, step: Step, segment: int, x: State, memory: BranchMemory) -> Action:
        return Action.REUSE if step.index in self.reused else Action.COMPUTE

    def approximate(self, step: Step, segment: int, action: Action, memory: BranchMemory) -> State:
        cached_step, residual = memory.segments[segment].history[-1]
        if not self.config.correct:
            return residual
        gain = self.profile.stack_gain[step.index][cached_step]
        return tuple(None if r is None else r * gain for r in residual)
