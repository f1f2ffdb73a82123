"""TeaCache (Liu et al. 2025, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model").

The change of the first block's input, rescaled by a polynomial fitted per model,
predicts how much the whole stack's output changes. Accumulate the prediction over
steps; reuse the stack's residual until it passes `threshold`, then compute.

The input signal here is family-agnostic: the relative change of the first block's
hidden states plus that of the timestep embedding it is modulated with. The polynomial
(`tempocache calibrate`) maps it to the stack's relative output change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..policy import Action, BranchMemory, Policy, State, Step, check_int, check_range
from ..profile import Profile, load_profile, teacache_signal


@dataclass(frozen=True)
class TeaCache:
    threshold: float = 0.1  # 0 computes every step
    coefficients: tuple[float, ...] | None = None  # highest power first; None: from the profile
    profile: str | Profile | None = None  # None: the shipped profile of a reference model
    warmup: int = 1

    def __post_init__(self):
        check_range("threshold", self.threshold, 0.0, 100.0)
        check_int("warmup", self.warmup, 1)

    def make_policy(self, transformer=None) -> Policy:
        coefficients = self.coefficients
        if coefficients is None:
            coefficients = load_profile(self.profile, transformer).teacache_coefficients
        return TeaCachePolicy(self, np.poly1d(coefficients))


class TeaCachePolicy(Policy):
    def __init__(self, config: TeaCache, polynomial: np.poly1d):
        self.config = config
        self.polynomial = polynomial

    def decide(self, step: Step, segment: int, x: State, memory: BranchMemory) -> Action:
        signal = teacache_signal(x, memory.temb, memory.scratch.get("previous"))
        memory.scratch["previous"] = (x[0], memory.temb)
        if step.index < self.config.warmup or signal is None:
            return Action.COMPUTE
        accumulated = memory.scratch.get("accumulated", 0.0) + max(0.0, float(self.polynomial(signal)))  # a fit can dip below 0
        if accumulated < self.config.threshold:
            memory.scratch["accumulated"] = accumulated
            return Action.REUSE
        memory.scratch["accumulated"] = 0.0
        return Action.COMPUTE

    def computed(self, step: Step, segment: int, x_in: State, x_out: State, memory: BranchMemory) -> None:
        if step.index == 0:  # decide() is not asked at the first step; start the signal here
            memory.scratch["previous"] = (x_in[0], memory.temb)
