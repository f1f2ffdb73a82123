"""`RegionE`'s knobs, checked before any compute."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RegionE:
    """RegionE (Chen et al., "RegionE: Adaptive Region-Aware Generation for Efficient Image Editing", 2025): an
    instruction editor recomputes only the tokens an edit changes.

    Steps before `partition_step` run in full; at it, the one-step estimate of the clean image is compared token by
    token with the image being edited (cosine similarity), and tokens at or above `threshold` are unedited; the mask
    is cleaned (erosion, then dilation, on the token grid) when `clean_mask`. Unedited tokens then jump in one Euler
    step to the next full step and wait there; edited tokens keep iterating alone, attending to the keys and values
    of every token (the image edited, the unedited ones, the instruction) kept from the last full step. Each of
    `refresh_steps` runs in full and rebuilds them; the last `final_steps` run in full to smooth the seams.
    Where more than `max_edited` of the image is edited (a global edit), the edit runs in full: never slower.
    Between full steps, an edited-only step may reuse the last one's velocity scaled by `gamma` (per step, fitted on
    calibration edits with `tempocache.region.fit_gamma`) while the accumulated change stays within
    `velocity_threshold` (0: always compute).
    """

    partition_step: int = 4
    threshold: float = 0.8
    refresh_steps: tuple[int, ...] = (11,)
    final_steps: int = 2
    velocity_threshold: float = 0.0
    gamma: tuple[float, ...] | None = None
    max_edited: float = 0.9
    clean_mask: bool = True

    def __post_init__(self):
        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not integer(self.partition_step) or self.partition_step < 0:
            raise ValueError(f"partition_step must be a step index (an integer >= 0), got {self.partition_step!r}")
        if not integer(self.final_steps) or self.final_steps < 0:
            raise ValueError(f"final_steps must be an integer >= 0, got {self.final_steps!r}")
        if not isinstance(self.refresh_steps, tuple) or not all(integer(s) for s in self.refresh_steps) or \
                list(self.refresh_steps) != sorted(set(self.refresh_steps)):
            raise ValueError(f"refresh_steps must be a tuple of increasing step indices, got {self.refresh_steps!r}")
        if any(s <= self.partition_step + 1 for s in self.refresh_steps):
            raise ValueError(f"refresh_steps {self.refresh_steps} must come after the partition step "
                             f"{self.partition_step} with an edited-only step between")
        checks = (("threshold", self.threshold, -1.0, 1.0, "a cosine similarity"),
                  ("velocity_threshold", self.velocity_threshold, 0.0, 1.0, "an accumulated relative change"),
                  ("max_edited", self.max_edited, 0.0, 1.0, "a fraction of the image's tokens"))
        for name, value, low, high, what in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    not low <= value <= high:
                raise ValueError(f"{name} is {what}, from {low} to {high}; got {value!r}")
        if self.max_edited == 0:
            raise ValueError("max_edited must be above 0 (at 0 every edit would run in full)")
        if self.gamma is not None and (not isinstance(self.gamma, tuple) or
                                       not all(isinstance(g, float) and g > 0 for g in self.gamma)):
            raise ValueError(f"gamma must be a tuple of positive floats, one per step, got {self.gamma!r}")
        if self.velocity_threshold > 0 and self.gamma is None:
            raise ValueError("a velocity cache (velocity_threshold > 0) needs gamma, fitted with "
                             "tempocache.region.fit_gamma on calibration edits")

    @classmethod
    def for_steps(cls, num_steps: int, **knobs) -> "RegionE":
        """RegionE's schedule for 28 steps (partition after a fifth, one refresh past the middle, the last
        tenth in full) scaled to `num_steps`; the defaults are it for 20."""
        partition = max(1, round(0.2 * num_steps))
        refresh = round(0.55 * num_steps)
        final = max(1, round(0.1 * num_steps))
        schedule = dict(partition_step=partition, final_steps=final,
                        refresh_steps=(refresh,) if partition + 1 < refresh < num_steps - final - 1 else ())
        return cls(**{**schedule, **knobs})

    def check(self, num_steps: int) -> None:
        """Raise ValueError where this schedule does not fit `num_steps` steps."""
        last_region = num_steps - self.final_steps - 1  # the last step that may run edited-only
        if self.partition_step + 1 > last_region:
            raise ValueError(f"partition_step {self.partition_step} is outside the schedule: with {num_steps} steps and "
                             f"final_steps={self.final_steps} it must be at most {last_region - 1}, leaving an "
                             f"edited-only step")
        if self.refresh_steps and self.refresh_steps[-1] >= last_region:
            raise ValueError(f"refresh_steps {self.refresh_steps} are outside the schedule: with {num_steps} steps "
                             f"and final_steps={self.final_steps} they must be below {last_region}")
        if self.gamma is not None and len(self.gamma) != num_steps:
            raise ValueError(f"gamma has {len(self.gamma)} factors for {num_steps} steps: fit it for this schedule")

    def phase(self, step: int, num_steps: int) -> str:
        """"full", "partition", "refresh", "region" (edited tokens only) or "final" for step index `step`."""
        if step < self.partition_step:
            return "full"
        if step == self.partition_step:
            return "partition"
        if step >= num_steps - self.final_steps:
            return "final"
        return "refresh" if step in self.refresh_steps else "region"

    def next_full(self, step: int, num_steps: int) -> int:
        """The step after `step` at which every token is computed again (num_steps: none, the end)."""
        return next((s for s in self.refresh_steps if s > step), num_steps - self.final_steps)
