"""Auto's zero-shot prior: a profile for a model that has none, made from other models' profiles.

Diffusion transformers trained with the same objective share the shape of their profiles:
where along the trajectory their residuals move fast, how reuse and forecast errors grow
with the gap between steps, how the error splits over the depth of the stack. The prior
keeps those shapes and drops everything model-specific: each source profile is put on the
target's grid (steps by their fraction of the trajectory, interpolated; segments by their
share of the depth), scaled by its own typical error, and the sources are averaged. The
closed-loop choices (step sensitivities, the planner variant per budget) are carried over
the same way.

The sources' closed-loop-refined schedules carry more than their tables do (open-loop
tables cannot see how errors compound), so where sources have refined a whole-stack
schedule, `prior_schedule` carries those over instead of planning from the averaged
tables: the k-th computed step goes where the sources put their k-th, by its fraction of
the trajectory, and each skipped step reuses or forecasts as most sources do there.
A profile never informs the prior of its own model: a model that has a profile and is
planned zero-shot sees only the others.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy.interpolate import RegularGridInterpolator

from .policy import Action
from .profile import CALIBRATE, Profile

SEGMENTS = 4


def check_sources(sources: list[Profile]) -> None:
    if not sources:
        raise ValueError("zero-shot Auto plans from other models' profiles, and none is registered: calibrate this "
                         f"model, {CALIBRATE}, or register profiles (tempocache.models.register_profile)")


def segment_edges(num_blocks: int) -> list[int]:
    segments = min(SEGMENTS, num_blocks)
    return [round(k * num_blocks / segments) for k in range(segments + 1)]


def prior_variants(sources: list[Profile]) -> dict[str, list]:
    """Per budget any source calibrated, the planner variant most sources chose there."""
    budgets = sorted({b for p in sources for b in p.auto_variants}, key=float)
    return {b: list(Counter(tuple(p.auto_variants[b]) for p in sources if b in p.auto_variants).most_common(1)[0][0])
            for b in budgets}


def prior_profile(sources: list[Profile], num_blocks: int, num_steps: int) -> Profile:
    """A profile of a stack of `num_blocks` blocks run for `num_steps` steps, from `sources`."""
    check_sources(sources)
    edges = segment_edges(num_blocks)
    parts = [_on_grid(p, num_steps, np.array(edges) / num_blocks) for p in sources]
    mean = {key: np.mean([part[key] for part in parts], axis=0) for key in parts[0]}
    return Profile(
        model="prior", num_steps=num_steps, edges=edges, timesteps=mean["timesteps"].tolist(),
        output_norm=[1.0] * num_steps, reuse_error=mean["reuse"].tolist(), forecast_error=mean["forecast"].tolist(),
        stack_reuse_error=mean["stack_reuse"].tolist(), stack_forecast_error=mean["stack_forecast"].tolist(),
        stack_gain=[], teacache_coefficients=[], prompts=[],
        sensitivity=mean["sensitivity"].tolist() if all(p.sensitivity for p in sources) else [],
        auto_variants=prior_variants(sources),
    )


def prior_schedule(sources: list[Profile], budget: float, num_steps: int) -> list[list[Action]] | None:
    """A whole-stack schedule for `num_steps` steps computing floor(budget x num_steps) of them, from the sources'
    refined whole-stack schedules at the budgets nearest `budget`; None if no source refined one (or budget is
    below one step)."""
    refined = [schedule for schedule in (whole_stack_schedule(p, budget) for p in sources) if schedule]
    computed_count = int(np.floor(budget * num_steps + 1e-9))
    if not refined or computed_count < 1:
        return None
    places = []  # [source][k]: where the source computes its k-th step (ranks stretched), as a fraction of its steps
    for schedule in refined:
        steps = [s for s, a in enumerate(schedule) if a is Action.COMPUTE]
        ranks = np.interp(np.linspace(0, 1, computed_count), np.linspace(0, 1, len(steps)), steps)
        places.append(ranks / max(len(schedule) - 1, 1))
    steps = np.round(np.mean(places, axis=0) * (num_steps - 1)).astype(int)
    for k in range(1, computed_count):  # distinct steps, in order, within the trajectory
        steps[k] = max(steps[k], steps[k - 1] + 1)
    for k in reversed(range(computed_count)):
        steps[k] = min(steps[k], num_steps - computed_count + k)
    computed = set(steps.tolist())
    actions, seen = [], 0
    for step in range(num_steps):
        if step in computed:
            actions.append(Action.COMPUTE)
            seen += 1
            continue
        votes = [_skipped_near(schedule, step / max(num_steps - 1, 1)) for schedule in refined]
        forecast = votes.count(Action.FORECAST) > len(votes) / 2 and seen >= 2  # a forecast needs two computed steps
        actions.append(Action.FORECAST if forecast else Action.REUSE)
    return [actions]


def _skipped_near(schedule: list[Action], fraction: float) -> Action:
    """The action of the schedule's skipped step nearest `fraction` of its trajectory (the later one on a tie)."""
    place = fraction * (len(schedule) - 1)
    skipped = [s for s, a in enumerate(schedule) if a is not Action.COMPUTE] or [0]
    return schedule[min(skipped, key=lambda s: (abs(s - place), -s))]


def whole_stack_schedule(profile: Profile, budget: float) -> list[Action] | None:
    """The profile's refined whole-stack schedule at the budget nearest `budget` among those it has one for."""
    whole = {float(b): stored["schedule"][0] for b, stored in profile.auto_schedules.items() if len(stored["edges"]) == 2}
    if not whole:
        return None
    return [Action(a) for a in whole[min(whole, key=lambda b: abs(b - budget))]]


def _on_grid(profile: Profile, num_steps: int, depths: np.ndarray) -> dict[str, np.ndarray]:
    """`profile`'s tables on the target's steps and segments (edges at `depths`, fractions of the stack), divided by
    its mean error of reusing the whole stack's residual from the step before."""
    grid = np.arange(profile.num_steps, dtype=float)
    x = np.linspace(0, profile.num_steps - 1, num_steps)  # each target step's place on the source's steps
    stack_reuse = np.array(profile.stack_reuse_error)
    scale = np.mean([stack_reuse[s, s - 1] for s in range(1, profile.num_steps)])

    def resample(table) -> np.ndarray:
        table = np.asarray(table, dtype=float)
        points = np.stack(np.meshgrid(*[x] * table.ndim, indexing="ij"), axis=-1)
        return RegularGridInterpolator([grid] * table.ndim, table)(points) / scale

    source_depths = np.array(profile.edges) / profile.edges[-1]
    # share of each source segment (columns) inside each target segment (rows)
    overlap = np.clip(np.minimum(depths[1:, None], source_depths[None, 1:]) - np.maximum(depths[:-1, None], source_depths[None, :-1]),
                      0, None) / np.diff(source_depths)[None]
    reuse = np.stack([resample(t) for t in profile.reuse_error])
    forecast = np.stack([resample(t) for t in profile.forecast_error])
    timesteps = np.array(profile.timesteps) / abs(profile.timesteps[0])
    sensitivity = np.array(profile.sensitivity) if profile.sensitivity else np.ones(profile.num_steps)
    return {
        "timesteps": np.interp(x, grid, timesteps),
        "reuse": np.tensordot(overlap, reuse, axes=1),
        "forecast": np.tensordot(overlap, forecast, axes=1),
        "stack_reuse": resample(profile.stack_reuse_error),
        "stack_forecast": resample(profile.stack_forecast_error),
        "sensitivity": np.interp(x, grid, sensitivity / sensitivity.mean()),
    }
