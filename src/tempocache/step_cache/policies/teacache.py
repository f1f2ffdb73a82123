"""TeaCache (Liu et al. 2025, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model").

The change of the first block's input, rescaled by a polynomial fitted per model,
predicts how much the whole stack's output changes. Accumulate the prediction over
steps; reuse the stack's residual until it passes `threshold`, then compute.

The input signal here is family-agnostic: the relative change of the first block's
hidden states plus that of the timestep embedding it is modulated with. The polynomial
(`tempocache calibrate`) maps it to the stack's relative output change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.distributed import ProcessGroup

from ..policy import Action, BranchMemory, Policy, State, Step, StepCacheConfig, check_int, check_range, relative_change
from ..profile import ProfileArg, require_profile


def teacache_signal(x: State, temb: torch.Tensor | None, previous: tuple | None,
                    group: ProcessGroup | None = None) -> float | None:
    """TeaCache's input signal: the relative change of the first block's input and of its timestep embedding (over
    every rank's shard of each, with `group`: a per-token embedding is split as the tokens are)."""
    if previous is None:
        return None
    signal = relative_change(x[0], previous[0], group)
    if temb is not None and previous[1] is not None:
        signal += relative_change(temb, previous[1], group)
    return signal


@dataclass(frozen=True)
class TeaCache(StepCacheConfig):
    threshold: float = 0.1  # 0 computes every step
    coefficients: tuple[float, ...] | None = None  # highest power first; None: from the profile
    profile: ProfileArg = None  # None: the registered profile of this model
    warmup: int = 1

    def __post_init__(self):
        check_range("threshold", self.threshold, 0.0, 100.0)
        check_int("warmup", self.warmup, 1)
        if self.coefficients is not None:
            numbers = isinstance(self.coefficients, (tuple, list)) and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in self.coefficients)
            if not numbers or not self.coefficients:
                raise ValueError("coefficients must be a non-empty sequence of finite numbers (the polynomial's, highest "
                                 f"power first), or None to take the profile's; got {self.coefficients!r}")

    def make_policy(self, transformer: nn.Module | None = None) -> Policy:
        coefficients = self.coefficients
        if coefficients is None:
            coefficients = require_profile(self.profile, transformer, "TeaCache").teacache_coefficients
        return TeaCachePolicy(self, np.poly1d(coefficients))


@dataclass
class TeaCacheState:
    previous: tuple | None = None  # (the first block's input, its timestep embedding) at the last step
    accumulated: float = 0.0  # predicted change since the stack was last computed


class TeaCachePolicy(Policy):
    def __init__(self, config: TeaCache, polynomial: np.poly1d):
        self.config = config
        self.polynomial = polynomial

    def new_state(self) -> TeaCacheState:
        return TeaCacheState()

    def decide(self, step: Step, segment: int, x: State, memory: BranchMemory) -> Action:
        state: TeaCacheState = memory.state
        signal = teacache_signal(x, memory.temb, state.previous, step.group)
        state.previous = (x[0], memory.temb)
        if step.index < self.config.warmup or signal is None:
            return Action.COMPUTE
        accumulated = state.accumulated + max(0.0, float(self.polynomial(signal)))  # a fit can dip below 0
        if accumulated < self.config.threshold:
            state.accumulated = accumulated
            return Action.REUSE
        state.accumulated = 0.0
        return Action.COMPUTE

    def computed(self, step: Step, segment: int, x_in: State, x_out: State, memory: BranchMemory) -> None:
        if step.index == 0:  # decide() is not asked at the first step; start the signal here
            memory.state.previous = (x_in[0], memory.temb)
