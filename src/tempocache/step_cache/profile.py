"""Profiles: what full-compute trajectories of a model say about the cost of skipping.

A profile (`tempocache calibrate`, see `calibrate.py`) tabulates, averaged over prompts and
CFG branches, for each segment of the block stack and for the whole stack:
- the error of reusing its residual from an earlier step, and of forecasting it (first-order
  Taylor) from two earlier steps, in units of the model output;
- the stack residual's least-squares gain between steps (ERTACache);
- TeaCache's polynomial from its input signal to the stack's output change;
and, from closed-loop runs, each step's sensitivity (how far an error made there moves the
final sample) and Auto's best planner variant and refined schedule per budget.
Profiles are JSON, found by the fingerprint of the model they were measured on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models import find_profile, fingerprint
from .policy import Action


@dataclass
class Profile:
    model: str  # transformer class
    num_steps: int
    edges: list[int]  # segment boundaries in blocks
    timesteps: list[float]
    output_norm: list[float]  # mean |model output| per step
    reuse_error: list  # [segment][step][earlier step]
    forecast_error: list  # [segment][step][last computed][the one before]
    stack_reuse_error: list  # [step][earlier step], the whole stack as one segment
    stack_forecast_error: list  # [step][last computed][the one before]
    stack_gain: list  # [step][earlier step]: least-squares scale of the reused stack residual
    teacache_coefficients: list[float]
    prompts: list[str]
    fingerprint: str = ""  # of the transformer it was measured on (models.fingerprint)
    # [step]: final-sample drift per unit of output error made at that step alone, measured closed-loop
    sensitivity: list[float] = field(default_factory=list)
    # Auto's planner variant per budget, chosen by closed-loop runs (see planner.VARIANTS)
    auto_variants: dict[str, list] = field(default_factory=dict)
    auto_drift: dict[str, list] = field(default_factory=dict)  # budget -> closed-loop drift of each variant
    # budget -> {"edges", "schedule": [segment][step] action values, "drift"}: the best variant's plan, refined closed-loop
    auto_schedules: dict[str, dict] = field(default_factory=dict)

    def auto_variant(self, budget: float) -> tuple[float, bool, bool] | None:
        """The planner variant calibrate chose at the calibrated budget nearest `budget`, if any was."""
        return nearest_variant(self.auto_variants, budget)

    def auto_schedule(self, budget: float) -> tuple[list[int], list[list[Action]]] | None:
        """The refined schedule calibrate stored for exactly this budget, if any."""
        for key, stored in self.auto_schedules.items():
            if abs(float(key) - budget) < 1e-9:
                return list(stored["edges"]), [[Action(a) for a in segment] for segment in stored["schedule"]]
        return None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        return cls(**json.loads(Path(path).read_text()))

    def check_steps(self, num_steps: int, policy: str) -> None:
        if num_steps != self.num_steps:
            raise ValueError(f"{policy}'s profile was made for {self.num_steps} steps, this generation has {num_steps}: "
                             f"calibrate it with runs of {num_steps} steps, {CALIBRATE}")

    def step_weights(self, sensitive: bool = False) -> np.ndarray:
        """How much an error in the model output at each step moves the sample: the sampler's step size,
        times the measured closed-loop sensitivity if `sensitive` (and it was measured)."""
        t = np.array(self.timesteps + [0.0])
        weights = np.abs(np.diff(t)) / max(abs(t[0]), 1e-12)
        return weights * np.array(self.sensitivity) if sensitive and self.sensitivity else weights


def nearest_variant(variants: dict[str, list], budget: float) -> tuple[float, bool, bool] | None:
    """The planner variant of the budget nearest `budget` among `variants` (budget -> variant), if any."""
    if not variants:
        return None
    penalty, whole_stack, sensitive = variants[min(variants, key=lambda b: abs(float(b) - budget))]
    return float(penalty), bool(whole_stack), bool(sensitive)


ProfileArg = str | Path | Profile | None


def load_profile(profile: ProfileArg, transformer: torch.nn.Module | None) -> Profile | None:
    """`profile` itself, loaded from its path, or (None) the registered profile of `transformer`, if there is one;
    refused if it was measured on another model than `transformer`."""
    if profile is None:
        profile = find_profile("step_cache", transformer) if transformer is not None else None
        if profile is None:
            return None
    if not isinstance(profile, (Profile, str, Path)):
        raise TypeError(f"profile must be a tempocache.Profile or the path of its JSON, got {type(profile).__name__}")
    loaded = profile if isinstance(profile, Profile) else _read(Path(profile))
    if transformer is not None and loaded.fingerprint and loaded.fingerprint != fingerprint(transformer):
        source = "this profile" if isinstance(profile, Profile) else f"profile {str(profile)!r}"
        raise ValueError(f"{source} was measured on another model ({loaded.model} with another config) than this "
                         f"{type(transformer).__name__}; calibrate this one: {CALIBRATE}")
    return loaded


def _read(path: Path) -> Profile:
    if not path.is_file():
        raise FileNotFoundError(f"no step-cache profile at {str(path)!r}")
    try:
        return Profile.load(path)
    except (ValueError, TypeError) as error:  # not JSON, or not a profile's fields
        raise ValueError(f"{str(path)!r} is not a step-cache profile (a JSON written by tempocache.calibrate): {error}") from None


CALIBRATE = ("tempocache.calibrate(pipe, prompts) from Python, then pass profile=<the JSON Profile.save writes> (for the "
             "shipped models, also `tempocache calibrate --model NAME`)")


def require_profile(profile: ProfileArg, transformer: torch.nn.Module | None, policy: str) -> Profile:
    found = load_profile(profile, transformer)
    if found is None:
        name = type(transformer).__name__ if transformer is not None else "this model"
        raise ValueError(f"{policy} needs a profile and there is none for {name}: {CALIBRATE}")
    return found
