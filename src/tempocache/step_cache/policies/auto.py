"""Auto: the least predicted error for a compute budget, planned from the model's profile (ours).

The profile (`tempocache calibrate`) says, for each segment of the block stack and each
step, how far its residual is from the residual computed at any earlier step, and from
the first-order forecast from any two earlier computed steps. The planner (`planner.py`)
picks per segment the steps to compute, and reuse or forecast at the others, that
minimise the summed error within the budget: where the profile shows a segment is stable
it is computed rarely, where it moves fast often. `calibrate` also runs the planner's
variants closed-loop, keeps per budget the one whose samples drift least from full
compute, and refines its plan closed-loop; Auto uses that refined schedule at a
calibrated budget, and plans with the nearest calibrated budget's variant at any other.

A model without a profile is planned zero-shot, from the prior that other models'
profiles make (`prior.py`: their refined schedules where they have them, else a plan from
their averaged tables), for the step count of each generation as it starts: no
calibration is needed, and Auto warns that calibrating would do better.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ...models import find_blocks, fingerprint, registered_profiles
from ..planner import VARIANTS, Schedule, Variant, auto_plan
from ..policy import Action, BranchMemory, Policy, State, Step, StepCacheConfig, check_range
from ..prior import (check_sources, prior_profile, prior_schedule, prior_variants, segment_edges,
                     whole_stack_schedule)
from ..profile import CALIBRATE, Profile, ProfileArg, load_profile, nearest_variant


@dataclass(frozen=True)
class Auto(StepCacheConfig):
    budget: float = 0.33  # fraction of block compute to spend; 1.0 computes everything
    profile: ProfileArg = None  # None: the registered profile of this model; if none, plan zero-shot
    # plan() options; None: calibrate's refined schedule at this budget, else the variant it found best near it
    variant: Variant | None = None
    zero_shot: bool = False  # plan from the prior of other models' profiles even where this model has one

    def __post_init__(self):
        check_range("budget", self.budget, 0.0, 1.0, low_open=True)
        if self.zero_shot and self.profile is not None:
            raise ValueError("zero_shot=True plans without a profile; give profile or zero_shot, not both")
        if self.variant is not None and self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of the planner's (forecast_penalty, whole_stack, sensitive): "
                             f"{', '.join(map(str, VARIANTS))}; got {self.variant!r}")

    def make_policy(self, transformer: nn.Module | None = None) -> Policy:
        profile = None if self.zero_shot else load_profile(self.profile, transformer)
        if profile is None:
            if not self.zero_shot:
                warnings.warn(f"no profile for {type(transformer).__name__}: Auto plans zero-shot from other models' "
                              f"profiles; a profile of its own would plan it better: {CALIBRATE}", stacklevel=4)
            return self._zero_shot_policy(transformer)
        stored = None if self.variant else profile.auto_schedule(self.budget)
        edges, schedule = stored or auto_plan(profile, self.budget, self.variant or profile.auto_variant(self.budget) or VARIANTS[0])

        def planned(num_steps: int) -> Schedule:
            profile.check_steps(num_steps, "Auto")
            return schedule

        return AutoPolicy(edges, planned, default_steps=profile.num_steps)

    def _zero_shot_policy(self, transformer: nn.Module) -> Policy:
        own = fingerprint(transformer)
        sources = [p for p in map(Profile.load, registered_profiles("step_cache")) if p.fingerprint != own]
        check_sources(sources)
        num_blocks = len(find_blocks(transformer))
        # the sources' refined schedules where they have them, unless a planner variant is asked for
        carried = self.variant is None and any(whole_stack_schedule(p, self.budget) for p in sources)
        variant = self.variant or nearest_variant(prior_variants(sources), self.budget) or VARIANTS[0]
        edges = [0, num_blocks] if carried or variant[1] else segment_edges(num_blocks)
        plans: dict[int, Schedule] = {}

        def planned(num_steps: int) -> Schedule:
            if num_steps not in plans:
                schedule = prior_schedule(sources, self.budget, num_steps) if carried else None
                plans[num_steps] = schedule or auto_plan(prior_profile(sources, num_blocks, num_steps), self.budget, variant)[1]
            return plans[num_steps]

        return AutoPolicy(edges, planned, default_steps=None)


class AutoPolicy(Policy):
    """Runs a schedule of actions per segment and step; `planned(num_steps)` gives it for a generation's step count."""

    history = 2

    def __init__(self, edges: list[int], planned: Callable[[int], Schedule], default_steps: int | None):
        self.edges = edges
        self.planned = planned
        self.default_steps = default_steps  # assumed when a generation does not tell its step count
        self.schedule: Schedule = []

    def check(self, num_blocks: int) -> None:
        if self.edges[-1] != num_blocks:
            raise ValueError(f"the profile is for a stack of {self.edges[-1]} blocks, this model has {num_blocks}")

    def boundaries(self, num_blocks: int) -> list[int]:
        return list(self.edges)

    def check_step(self, step: Step) -> None:
        if step.num_steps is None and (self.default_steps is None or step.steps_unknown):
            step.require_num_steps("Auto")
        num_steps = step.num_steps or max(self.default_steps, step.index + 1)
        # one step (a streaming model's pass over its clean chunk) has nothing to reuse: computed at any budget
        self.schedule = self.planned(num_steps) if num_steps > 1 else [[Action.COMPUTE] for _ in self.edges[1:]]

    def decide(self, step: Step, segment: int, x: State, memory: BranchMemory) -> Action:
        return self.schedule[segment][step.index]
