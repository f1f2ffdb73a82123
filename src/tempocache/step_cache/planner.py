"""Auto's planner: the schedule of least predicted error within a compute budget, from a profile.

An error in the model output at step s moves the sample by the sampler's step size there,
so each profile error is weighted by it (and, in the `sensitive` variant, by the measured
closed-loop sensitivity of that step). The plan is exact for the profile's tables:
1. per segment, for every count n of computed steps, the set of steps to compute that
   minimises the summed weighted error of the others, each reused or forecast, whichever
   the profile says is closer (a dynamic programme over the last two computed steps);
2. across segments, the counts that minimise the total error within the budget (a
   knapsack over block-steps).
Open-loop tables cannot see how errors compound, so `refine_schedule` searches nearby
schedules closed-loop (calibrate runs it, with the drift of the generated samples on each
half of its prompts).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .policy import Action
from .profile import Profile

# Budgets calibrate compares and refines Auto's plans at; Auto at any other budget plans from the nearest one's variant.
BUDGETS = (0.7, 0.6, 0.5, 0.45, 0.4, 0.37, 0.33, 0.25, 0.2)
# Planner variants calibrate tries: (forecast error penalty, plan the whole stack as one segment, weight steps by their
# measured closed-loop sensitivity). The first is the default where a profile has no closed-loop choice.
VARIANTS = tuple((penalty, whole, sensitive) for penalty in (1.0, float("inf")) for whole in (True, False)
                 for sensitive in (False, True))
Variant = tuple[float, bool, bool]
Schedule = list[list[Action]]  # [segment][step]


def auto_plan(profile: Profile, budget: float, variant: Variant) -> tuple[list[int], Schedule]:
    """Segment edges and the planned [segment][step] actions for one planner variant."""
    penalty, whole_stack, sensitive = variant
    return plan_edges(profile, whole_stack), plan(profile, budget, penalty, whole_stack, sensitive)


def plan_edges(profile: Profile, whole_stack: bool) -> list[int]:
    """The segment edges a plan decides on: the profile's, or the whole stack as one."""
    return [0, profile.edges[-1]] if whole_stack else list(profile.edges)


def plan(profile: Profile, budget: float, forecast_penalty: float = 1.0, whole_stack: bool = False,
         sensitive: bool = False) -> Schedule:
    """[segment][step] -> action, spending at most `budget` of the block compute.

    `forecast_penalty` scales the forecast errors (inf: reuse only); `whole_stack` plans the
    stack as one segment; `sensitive` weights each step's errors by the profile's measured
    closed-loop sensitivity as well as by the sampler's step size.
    """
    steps = profile.num_steps
    edges = plan_edges(profile, whole_stack)
    reuse = [profile.stack_reuse_error] if whole_stack else profile.reuse_error
    forecast = [profile.stack_forecast_error] if whole_stack else profile.forecast_error
    sizes = np.diff(edges)
    capacity = int(np.floor(budget * steps * edges[-1] + 1e-9))
    if capacity < edges[-1]:
        raise ValueError(f"budget {budget} is below one full step in {steps} ({1 / steps:.3f}); the first step is always computed")
    weights = profile.step_weights(sensitive)
    penalised = [np.array(f) * forecast_penalty if np.isfinite(forecast_penalty) else np.full(np.shape(f), np.inf)
                 for f in forecast]
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


def refine_schedule(drift: Callable[[Schedule], tuple[float, ...]], schedule: Schedule, runs: int) -> Schedule:
    """Greedy closed-loop search among schedules of the same compute, within `runs` evaluations.

    The planner's error tables are open-loop; the closed loop can prefer other steps (an
    early reuse that looks cheap may steer the whole trajectory off). Each sweep tries, on
    the current schedule, moving one computed step of a segment a step earlier or later
    and switching a run of skipped steps between reuse and forecast, keeping every change
    that lowers every component of `drift` (calibrate's: the drift of each half of its
    samples, so that a change that suits a few prompts only is not kept). Step 0 is always
    computed. `runs` counts the candidates; the start is evaluated once more.
    """
    error = drift(schedule)
    improved = True
    while improved and runs > 0:
        improved = False
        moves = [(k, s, d) for k, segment in enumerate(schedule) for s, a in enumerate(segment) if s > 0
                 for d in ((-1, 1) if a is Action.COMPUTE else (0,))]
        for k, s, d in moves:
            if runs == 0:
                break
            candidate = _moved(schedule, k, s, d)
            if candidate is None:
                continue
            runs -= 1
            candidate_error = drift(candidate)
            if all(c < e for c, e in zip(candidate_error, error)):
                schedule, error, improved = candidate, candidate_error, True
    return schedule


def _moved(schedule: Schedule, k: int, s: int, d: int) -> Schedule | None:
    """Segment k's computed step s moved by d; or (d = 0) the run of skipped steps at s switched reuse <-> forecast
    (only from its first step, so each run is one move). None if the move does not apply."""
    segment = list(schedule[k])
    if d:
        target = s + d
        if segment[s] is not Action.COMPUTE or not 0 < target < len(segment) or segment[target] is Action.COMPUTE:
            return None
        segment[s], segment[target] = segment[target], Action.COMPUTE
    else:
        if segment[s] is Action.COMPUTE or segment[s - 1] is not Action.COMPUTE:
            return None
        flipped = Action.REUSE if segment[s] is Action.FORECAST else Action.FORECAST
        while s < len(segment) and segment[s] is not Action.COMPUTE:
            segment[s] = flipped
            s += 1
    return [segment if i == k else schedule[i] for i in range(len(schedule))]
