"""Auto's zero-shot prior: a profile for a model that has none, made from other models' profiles.

Diffusion transformers trained with the same objective share the shape of their profiles:
where along the trajectory their residuals move fast, how reuse and forecast errors grow
with the gap between steps, how the error splits over the depth of the stack. The prior
keeps those shapes and drops everything model-specific: each source profile is put on the
target's grid (steps by their fraction of the trajectory, interpolated; segments by their
share of the depth), scaled by its own typical error, and the sources are averaged. The
closed-loop choices (step sensitivities, the planner variant per budget) are carried over
the same way. A profile never informs the prior of its own model: a model that has a
profile and is planned zero-shot sees only the others.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy.interpolate import RegularGridInterpolator

from .profile import Profile

SEGMENTS = 4


def check_sources(sources: list[Profile]) -> None:
    if not sources:
        raise ValueError("zero-shot Auto plans from other models' profiles, and none is registered: calibrate this "
                         "model (`tempocache calibrate`) or register a profile (tempocache.models.register_profile)")


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
