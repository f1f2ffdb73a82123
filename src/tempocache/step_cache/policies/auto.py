"""Auto: the least predicted error for a compute budget, planned from the model's profile (ours).

The profile (`tempocache calibrate`) says, for each segment of the block stack and each
step, how far its residual is from (a) the residual computed at any earlier step, and
(b) the first-order forecast from any two earlier computed steps, in units of the
model output. An error in the output at step s moves the sample by the sampler's step
size there, so each is weighted by it. Auto then plans exactly:
1. per segment, for every count n of computed steps, the set of steps to compute that
   minimises the summed weighted error of the others, each reused or forecast,
   whichever the profile says is closer (a dynamic programme over the last two
   computed steps);
2. across segments, the counts that minimise the total error within the budget
   (a knapsack over block-steps).
Where the profile shows a segment is stable it is computed rarely, where it moves fast
often: no fixed rule, the profile decides. Open-loop tables cannot see how errors
compound along the trajectory (later steps partly undo an early error, or amplify it), so
`calibrate` also measures closed-loop how far an error at each step alone moves the final
sample, runs a few planner variants (forecast penalty, whole stack or segments, steps
weighted by that sensitivity or not) closed-loop, keeps per budget the one that drifts
least from full compute, and refines its plan closed-loop (moving computed steps,
switching reuse and forecast). Auto uses that refined schedule at a calibrated budget,
and plans with the nearest calibrated budget's variant at any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..policy import Action, BranchMemory, Policy, State, Step, check_range
from ..profile import Profile, load_profile


@dataclass(frozen=True)
class Auto:
    budget: float = 0.33  # fraction of block compute to spend; 1.0 computes everything
    profile: str | Profile | None = None  # None: the shipped profile of a reference model
    # plan() options; None: calibrate's refined schedule at this budget, else the variant it found best near it
    variant: tuple[float, bool, bool] | None = None

    def __post_init__(self):
        check_range("budget", self.budget, 0.0, 1.0, low_open=True)

    def make_policy(self, transformer=None) -> Policy:
        profile = load_profile(self.profile, transformer)
        stored = None if self.variant else profile.auto_schedule(self.budget)
        edges, schedule = stored or auto_plan(profile, self.budget, self.variant or profile.auto_variant(self.budget))
        return AutoPolicy(self, profile, edges, schedule)


class AutoPolicy(Policy):
    history = 2

    def __init__(self, config: Auto, profile: Profile, edges: list[int], schedule: list[list[Action]]):
        self.config = config
        self.profile = profile
        self.edges = edges
        self.schedule = schedule

    def check(self, num_blocks: int) -> None:
        if self.profile.edges[-1] != num_blocks:
            raise ValueError(f"the profile is for a stack of {self.profile.edges[-1]} blocks, this model has {num_blocks}")

    def boundaries(self, num_blocks: int) -> list[int]:
        return list(self.edges)

    def check_step(self, step: Step) -> None:
        self.profile.check_steps(step.num_steps or max(self.profile.num_steps, step.index + 1), "Auto")  # unknown: assume the profile's

    def decide(self, step: Step, segment: int, x: State, memory: BranchMemory) -> Action:
        return self.schedule[segment][step.index]


def auto_plan(profile: Profile, budget: float, variant: tuple[float, bool, bool]) -> tuple[list[int], list[list[Action]]]:
    """Segment edges and the planned [segment][step] actions for one planner variant."""
    penalty, whole_stack, sensitive = variant
    edges = [0, profile.edges[-1]] if whole_stack else list(profile.edges)
    return edges, plan(profile, budget, penalty, whole_stack, sensitive)


def plan(profile: Profile, budget: float, forecast_penalty: float = 1.0, whole_stack: bool = False,
         sensitive: bool = False) -> list[list[Action]]:
    """[segment][step] -> action, spending at most `budget` of the block compute.

    `forecast_penalty` scales the forecast errors (inf: reuse only); `whole_stack` plans the
    stack as one segment; `sensitive` weights each step's errors by the profile's measured
    closed-loop sensitivity as well as by the sampler's step size.
    """
    steps = profile.num_steps
    edges = [0, profile.edges[-1]] if whole_stack else profile.edges
    reuse = [profile.stack_reuse_error] if whole_stack else profile.reuse_error
    forecast = [profile.stack_forecast_error] if whole_stack else profile.forecast_error
    sizes = np.diff(edges)
    capacity = int(np.floor(budget * steps * edges[-1] + 1e-9))
    if capacity < edges[-1]:
        raise ValueError(f"budget {budget} is below one full step in {steps} ({1 / steps:.3f}); the first step is always computed")
    weights = profile.step_weights(sensitive)
    penalised = [np.array(f) * forecast_penalty if np.isfinite(forecast_penalty) else np.full(np.shape(f), np.inf) for f in forecast]
    curves = [_segment_curves(np.array(reuse[k]), penalised[k], weights) for k in range(len(sizes))]
    counts = _allocate([c[0] for c in curves], sizes, capacity)
    return [curves[k][1](n) for k, n in enumerate(counts)]


def _segment_curves(reuse: np.ndarray, forecast: np.ndarray, weights: np.ndarray):
    """(error[n - 1] for n = 1..S computed steps, n -> actions) for one segment.

    reuse[s, c] and forecast[s, c1, c2] are the profile's errors at step s.
    """
    S = len(weights)
    none = S  # stands for "no second computed step yet"
    earlier, later = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    forecast_cost = np.full((S + 1, S, S), np.inf)  # [c2, c1, s]
    forecast_cost[:S] = np.where((earlier < later)[:, :, None], np.transpose(forecast, (2, 1, 0)), np.inf)
    reuse_cost = np.broadcast_to(reuse.T[None], (S + 1, S, S))
    use_forecast = forecast_cost < reuse_cost
    cost = np.minimum(forecast_cost, reuse_cost) * weights
    cost = np.where((later > earlier)[None], cost, 0.0)
    cumulative = np.concatenate([np.zeros((S + 1, S, 1)), np.cumsum(cost, axis=2)], axis=2)
    # gap[c2, c1, c]: cost of the steps strictly between computed c1 and the next computed c (c = S: the end)
    c1 = np.arange(S)
    gap = cumulative - cumulative[:, c1, c1 + 1][:, :, None]
    gap = np.where(np.arange(S + 1)[None, None] > c1[None, :, None], gap, np.inf)

    best = np.full((S + 1, S), np.inf)  # [c2, c1]: least cost so far with c1 the last computed step
    best[none, 0] = 0.0
    finished, back = [], []
    for _ in range(S):
        finished.append(best + gap[:, :, S])
        total = best[:, :, None] + gap[:, :, :S]
        back.append(np.argmin(total, axis=0))
        best = np.full((S + 1, S), np.inf)
        best[:S] = np.min(total, axis=0)

    def actions(n: int) -> list[Action]:
        c2, c1 = np.unravel_index(np.argmin(finished[n - 1]), finished[n - 1].shape)
        computed = {int(c1)}
        for m in range(n, 1, -1):
            computed.add(int(c2))
            c2, c1 = back[m - 2][c2, c1], c2
        out, last_two = [], [none]
        for step in range(S):
            if step in computed:
                out.append(Action.COMPUTE)
                last_two = (last_two + [step])[-2:]
            else:
                out.append(Action.FORECAST if use_forecast[last_two[0], last_two[1], step] else Action.REUSE)
        return out

    return np.array([f.min() for f in finished]), actions


def _allocate(curves: list[np.ndarray], sizes: np.ndarray, capacity: int) -> list[int]:
    """Computed-step counts per segment minimising the summed error within `capacity` block-steps."""
    best = {0: (0.0, [])}  # block-steps used -> (error, counts)
    for curve, size in zip(curves, sizes):
        nxt: dict[int, tuple[float, list[int]]] = {}
        for used, (error, counts) in best.items():
            for n, e in enumerate(curve, start=1):
                total = used + n * int(size)
                if total <= capacity and (total not in nxt or error + e < nxt[total][0]):
                    nxt[total] = (error + e, counts + [n])
        best = nxt
    return min(best.values(), key=lambda v: v[0])[1]
