"""The step-cache engine on tiny random-weight transformers of ten diffusers families.

The transformer is driven directly by a small denoising loop (no pipeline): 6 steps,
timesteps 900 -> 100, x <- x - 0.1 * output. Zero-budget settings must be bit-identical
to the untouched model; caching settings must skip exactly what they say; state must not
leak between generations, CFG branches, batch sizes or resolutions; bad input must fail
clearly before any compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import tempocache
from tempocache.models import cache_context
from tempocache.step_cache.policy import Action, Step

sys.path.insert(0, str(Path(__file__).parent))
import families  # noqa: E402

STEPS = (900.0, 740.0, 580.0, 420.0, 260.0, 100.0)
N = len(STEPS)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


_BUILT: list = []


@pytest.fixture(autouse=True)
def _disable_leftovers():
    """A failing test must not leave hooks on a model another test builds from the same helper."""
    yield
    for fam in _BUILT:
        if getattr(fam.transformer, "_tempocache_step_cache", None) is not None:
            tempocache.disable(fam.transformer)
    _BUILT.clear()


def tiny(name: str):
    fam = families.tiny(name)
    _BUILT.append(fam)
    return fam


def num_blocks(fam) -> int:
    return sum(len(getattr(fam.transformer, b)) for b in fam.block_lists)


def call(fam, kwargs: dict, name: str | None = None, step: int | None = None, steps: int = N):
    """One transformer call, inside cache_context(name, step_index=step, ...) when a name is given."""
    context = cache_context(fam.transformer, name, step_index=step, num_inference_steps=steps) if name else contextlib.nullcontext()
    with context:
        return fam.transformer(**kwargs, return_dict=False)[0]


def denoise(fam, batch: int = 1, size: int = 8, seed: int = 0, steps=STEPS, context: str | None = None, record=None,
            pipe=None):
    """The toy sampler: x <- x - 0.1 * model(x, t) over `steps` (setting `pipe`'s timesteps first, as pipelines do)."""
    if pipe is not None:
        pipe.scheduler.set_timesteps(steps)
    x = fam.inputs(batch, size, steps[0], seed)["hidden_states"]
    for i, t in enumerate(steps):
        kwargs = fam.inputs(batch, size, t, seed)
        kwargs["hidden_states"] = x
        out = call(fam, kwargs, context, i, len(steps))
        if record is not None:
            record.append(out)
        x = x - 0.1 * out
    return x


def branch_loop(fam, seeds: dict[str, int], named: bool, record: dict | None = None) -> dict[str, torch.Tensor]:
    """Several independent trajectories, their calls interleaved at every step (as CFG branches are)."""
    xs = {n: fam.inputs(1, 8, STEPS[0], s)["hidden_states"] for n, s in seeds.items()}
    for i, t in enumerate(STEPS):
        for n, s in seeds.items():
            kwargs = fam.inputs(1, 8, t, s)
            kwargs["hidden_states"] = xs[n]
            out = call(fam, kwargs, n if named else None, i)
            if record is not None:
                record.setdefault(n, []).append(out)
            xs[n] = xs[n] - 0.1 * out
    return xs


class FakeScheduler:
    """What the engine reads from a scheduler: `timesteps`, a new tensor each time a generation sets them."""

    def __init__(self):
        self.timesteps = torch.tensor([1000.0])

    def set_timesteps(self, steps):
        self.timesteps = torch.tensor(steps)


def fake_pipe(fam):
    """What the engine reads from a pipeline: `.transformer`, and its `.scheduler` for the step count."""
    return types.SimpleNamespace(transformer=fam.transformer, scheduler=FakeScheduler())


_PROFILES: dict[str, tempocache.Profile] = {}


def profile_for(name: str) -> tempocache.Profile:
    """calibrate on the tiny model (seeds as prompts), once per family.

    The run names its calls with cache_context(num_inference_steps=...), as pipelines do.
    """
    if name not in _PROFILES:
        fam = tiny(name)
        pipe = types.SimpleNamespace(transformer=fam.transformer)
        _PROFILES[name] = tempocache.calibrate(pipe, [0, 1], run=lambda p, seed: denoise(fam, seed=seed, context="cond"),
                                               auto_budgets=(0.5,))
        assert not hasattr(fam.transformer, "_tempocache_step_cache")
    return _PROFILES[name]


# ---------------------------------------------------------------------------------------------
# 1. Every family: identity at zero budget, real skipping, no leaks, shape changes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", families.FAMILIES)
def test_zero_budget_and_disable_are_bit_identical(name):
    fam = tiny(name)
    reference = denoise(fam)
    engine = tempocache.enable(fam.transformer, tempocache.StaticCache(interval=1))
    assert engine.family == name
    enabled = denoise(fam)
    stats = tempocache.stats(fam.transformer)
    tempocache.disable(fam.transformer)
    disabled = denoise(fam)
    assert torch.equal(enabled, reference)
    assert torch.equal(disabled, reference)
    assert stats["blocks_computed"] == N * num_blocks(fam) and stats["blocks_reused"] == stats["blocks_forecast"] == 0
    assert stats["calls"] == stats["full_calls"] == N and stats["compute_fraction"] == 1.0 and stats["family"] == name
    assert not hasattr(fam.transformer, "_tempocache_step_cache")


@pytest.mark.parametrize("name", families.FAMILIES)
def test_static_interval_skips_exactly_the_planned_steps(name):
    fam = tiny(name)
    blocks = num_blocks(fam)
    reference = denoise(fam)
    tempocache.enable(fam.transformer, tempocache.StaticCache(interval=2, warmup=1))
    out = denoise(fam)
    stats = tempocache.stats(fam.transformer)
    # steps 0 (warmup), 1, 3, 5 computed; 2 and 4 reuse the whole stack's residual
    assert stats["blocks_reused"] == 2 * blocks
    assert stats["blocks_computed"] == 4 * blocks and stats["blocks_forecast"] == 0
    assert stats["block_calls"] == N * blocks
    assert stats["compute_fraction"] == pytest.approx(4 / 6)
    assert stats["calls"] == N and stats["full_calls"] == 4 and stats["skipped_calls"] == 0 and stats["generations"] == 1
    assert stats["cache_bytes"] > 0
    assert not torch.equal(out, reference)
    assert torch.isfinite(out).all()


# (config, blocks approximated over 5 calls with an unchanged input, for a stack of B blocks)
UNCHANGED_INPUT = [
    (tempocache.StaticCache(interval=2, warmup=1), lambda B: 2 * B),  # steps 2, 4 reused
    (tempocache.TaylorSeer(order=2, interval=4, warmup=2), lambda B: 2 * B),  # steps 3, 4 forecast
    (tempocache.DeltaDiT(interval=2), lambda B: B),  # step 2 the rear half, step 4 the front half
    (tempocache.DBCache(fn=1, bn=1, threshold=0.5), lambda B: 4 * (B - 2)),  # the middle at steps 1-4
    (tempocache.FirstBlockCache(threshold=0.5), lambda B: 4 * (B - 1)),
    (tempocache.TeaCache(threshold=0.5, coefficients=(1.0, 0.0)), lambda B: 4 * B),  # steps 1-4
    (tempocache.GatedTaylorSeer(order=2, threshold=0.5), lambda B: 3 * (B - 1)),  # steps 2-4 after the probe
    (tempocache.TemporalDeltaCache(threshold=0.5), lambda B: 4 * B),  # every block at steps 1-4
]


@pytest.mark.parametrize("name", families.FAMILIES)
def test_reused_and_forecast_residuals_reproduce_an_unchanged_input(name):
    """Where the input does not change between steps, every policy skips and a reused (or forecast) residual
    gives the full output: checks each family's state layout (which output is hidden_states, the encoder
    stream of dual-stream models) and segments spanning two block lists (flux, hunyuan_video)."""
    fam = tiny(name)
    blocks = num_blocks(fam)
    kwargs = fam.inputs(1, 8, 500.0, 0)
    full = fam.transformer(**kwargs, return_dict=False)[0]
    for config, approximated in UNCHANGED_INPUT:
        tempocache.enable(fam.transformer, config)
        outs = [call(fam, kwargs, "cond", i, 5) for i in range(5)]
        stats = tempocache.stats(fam.transformer)
        tempocache.disable(fam.transformer)
        assert stats["blocks_reused"] + stats["blocks_forecast"] == approximated(blocks), config
        assert stats["blocks_computed"] == 5 * blocks - approximated(blocks), config
        assert torch.equal(outs[0], full)
        for i, out in enumerate(outs):
            torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-5, msg=f"{config} step {i}")


@pytest.mark.parametrize("name", families.FAMILIES)
def test_consecutive_generations_do_not_leak_state(name):
    fam = tiny(name)
    config = tempocache.StaticCache(interval=2, warmup=1)
    tempocache.enable(fam.transformer, config)
    first = denoise(fam, seed=0)
    second = denoise(fam, seed=1)
    third = denoise(fam, seed=0)
    stats = tempocache.stats(fam.transformer)
    assert stats["generations"] == 3 and stats["calls"] == 3 * N
    assert stats["blocks_reused"] == 3 * 2 * num_blocks(fam)
    tempocache.disable(fam.transformer)

    tempocache.enable(fam.transformer, config)
    fresh_second = denoise(fam, seed=1)
    assert tempocache.stats(fam.transformer)["generations"] == 1
    tempocache.disable(fam.transformer)
    assert torch.equal(second, fresh_second)
    assert torch.equal(first, third)

    tempocache.enable(fam.transformer, config)
    denoise(fam, seed=0)
    denoise(fam, seed=1)
    assert tempocache.stats(fam.transformer)["generations"] == 2


@pytest.mark.parametrize("name", families.FAMILIES)
def test_batch_and_resolution_changes(name):
    fam = tiny(name)
    shapes = ((1, 8), (2, 12), (1, 8))
    references = [denoise(fam, batch=b, size=s, seed=3) for b, s in shapes]

    tempocache.enable(fam.transformer, tempocache.StaticCache(interval=1))
    outs = [denoise(fam, batch=b, size=s, seed=3) for b, s in shapes]
    assert tempocache.stats(fam.transformer)["generations"] == 3
    tempocache.disable(fam.transformer)
    for (b, s), out, ref in zip(shapes, outs, references):
        assert out.shape == ref.shape and out.shape[0] == b
        assert torch.equal(out, ref), (b, s)

    # Caching across a shape change equals caching from scratch at that shape.
    tempocache.enable(fam.transformer, tempocache.StaticCache(interval=2, warmup=1))
    cached = [denoise(fam, batch=b, size=s, seed=3) for b, s in shapes]
    tempocache.disable(fam.transformer)
    for (b, s), out in zip(shapes, cached):
        tempocache.enable(fam.transformer, tempocache.StaticCache(interval=2, warmup=1))
        fresh = denoise(fam, batch=b, size=s, seed=3)
        tempocache.disable(fam.transformer)
        assert torch.equal(out, fresh), (b, s)

    # The shape change alone starts afresh: here the next run starts below the timestep the last one stopped at.
    config = tempocache.StaticCache(interval=2, warmup=1)
    tempocache.enable(fam.transformer, config)
    denoise(fam, batch=1, size=8, seed=3, steps=STEPS[:3])
    tail = denoise(fam, batch=2, size=12, seed=3, steps=STEPS[3:])
    stats = tempocache.stats(fam.transformer)
    assert stats["generations"] == 2 and stats["blocks_reused"] == 2 * num_blocks(fam)  # step 2 of each run
    tempocache.disable(fam.transformer)
    tempocache.enable(fam.transformer, config)
    assert torch.equal(tail, denoise(fam, batch=2, size=12, seed=3, steps=STEPS[3:]))


# ---------------------------------------------------------------------------------------------
# 2. Every policy at zero budget is the identity (single- and dual-stream families)
# ---------------------------------------------------------------------------------------------

ZERO_BUDGET = {
    "StaticCache": lambda p: tempocache.StaticCache(interval=1),
    "DeltaDiT": lambda p: tempocache.DeltaDiT(interval=1, num_steps=N),
    "FirstBlockCache": lambda p: tempocache.FirstBlockCache(threshold=0),
    "DBCache": lambda p: tempocache.DBCache(fn=1, bn=1, threshold=0),
    "TeaCache": lambda p: tempocache.TeaCache(threshold=0, coefficients=(1.0, 0.0)),
    "TaylorSeer": lambda p: tempocache.TaylorSeer(interval=1),
    "GatedTaylorSeer": lambda p: tempocache.GatedTaylorSeer(threshold=0),
    "TemporalDeltaCache": lambda p: tempocache.TemporalDeltaCache(threshold=0),
    "Auto": lambda p: tempocache.Auto(budget=1.0, profile=p),
    "Auto-zero-shot": lambda p: tempocache.Auto(budget=1.0, zero_shot=True),
    "ERTACache": lambda p: tempocache.ERTACache(budget=1.0, profile=p),
}


@pytest.mark.parametrize("policy", ZERO_BUDGET)
@pytest.mark.parametrize("name", ["wan", "flux"])
def test_every_policy_at_zero_budget_is_bit_identical(name, policy):
    fam = tiny(name)
    profile = profile_for(name) if policy in ("Auto", "ERTACache") else None
    reference = denoise(fam)
    pipe = fake_pipe(fam)  # the step count comes from the "scheduler" (Auto and ERTACache need it)
    tempocache.enable(pipe, ZERO_BUDGET[policy](profile))
    out = denoise(fam, pipe=pipe)
    stats = tempocache.stats(pipe)
    tempocache.disable(pipe)
    assert torch.equal(out, reference)
    assert stats["policy"] == policy.split("-")[0]
    assert stats["compute_fraction"] == 1.0 and stats["blocks_computed"] == N * num_blocks(fam)
    assert torch.equal(denoise(fam), reference)


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_auto_and_ertacache_keep_to_their_budget(name):
    fam = tiny(name)
    profile = profile_for(name)
    assert profile.num_steps == N and profile.edges[-1] == num_blocks(fam) and "0.5" in profile.auto_variants
    assert len(profile.sensitivity) == N and all(s >= 0 for s in profile.sensitivity)
    # the refined schedule drifts no more than the best planner variant it started from, at the same compute
    refined = profile.auto_schedules["0.5"]
    assert refined["drift"] <= min(profile.auto_drift["0.5"])
    planned = tempocache.Auto(0.5, profile, variant=profile.auto_variant(0.5)).make_policy()
    planned.check_step(Step(0, N, STEPS[0], "cond"))
    assert [sum(a == "compute" for a in s) for s in refined["schedule"]] == [
        sum(a is Action.COMPUTE for a in s) for s in planned.schedule] and refined["edges"] == planned.edges
    stored = tempocache.Auto(0.5, profile).make_policy()
    stored.check_step(Step(0, N, STEPS[0], "cond"))
    assert stored.schedule == [[Action(a) for a in s] for s in refined["schedule"]]
    reference = denoise(fam)
    for config in (tempocache.Auto(budget=0.5, profile=profile), tempocache.ERTACache(budget=0.5, profile=profile)):
        pipe = fake_pipe(fam)
        tempocache.enable(pipe, config)
        out = denoise(fam, pipe=pipe)
        stats = tempocache.stats(pipe)
        tempocache.disable(pipe)
        assert stats["compute_fraction"] <= 0.5 + 1e-9, config
        assert stats["blocks_reused"] + stats["blocks_forecast"] > 0
        assert not torch.equal(out, reference)
        assert torch.isfinite(out).all()
    # Through cache_context instead of a scheduler, the same plan.
    tempocache.enable(fam.transformer, tempocache.Auto(budget=0.5, profile=profile))
    via_context = denoise(fam, context="cond")
    assert tempocache.stats(fam.transformer)["compute_fraction"] <= 0.5 + 1e-9
    tempocache.disable(fam.transformer)
    pipe = fake_pipe(fam)
    tempocache.enable(pipe, tempocache.Auto(budget=0.5, profile=profile))
    assert torch.equal(denoise(fam, pipe=pipe), via_context)


def test_refine_schedule_follows_the_closed_loop_within_its_runs_and_keeps_only_what_helps_both_halves():
    from tempocache.step_cache.planner import refine_schedule

    C, R, F = Action.COMPUTE, Action.REUSE, Action.FORECAST
    start = [[C, C, R, R, R, R]]

    def drift(schedule):  # both halves of this "closed loop" want the second computed step at 4 and no reuse
        computed = [s for s, a in enumerate(schedule[0]) if a is C]
        return (abs(computed[1] - 4) + sum(a is R for a in schedule[0]),) * 2

    assert refine_schedule(drift, start, runs=50) == [[C, F, F, F, C, F]]

    def one_half_only(schedule):  # the second half is hurt by every change the first one likes
        first = drift(schedule)[0]
        return first, -first

    assert refine_schedule(one_half_only, start, runs=50) == start
    calls = []
    assert refine_schedule(lambda s: calls.append(s) or (1.0, 1.0), start, runs=1) == start and len(calls) == 2
    assert refine_schedule(lambda s: calls.append(s) or (0.0, 0.0), start, runs=0) == start and len(calls) == 3


def _schedule_error(profile, edges, schedule, weights) -> float:
    """What a schedule costs by the profile's tables: each skipped step of a segment pays its weighted error of
    reuse from the last computed step, or of forecast from the last two, whichever is smaller."""
    table = {tuple(profile.edges[k:k + 2]): k for k in range(len(profile.edges) - 1)}
    total = 0.0
    for (start, end), actions in zip(zip(edges, edges[1:]), schedule):
        k = table[(start, end)]
        computed = [s for s, a in enumerate(actions) if a is Action.COMPUTE]
        for s in range(profile.num_steps):
            if s in computed:
                continue
            before = [c for c in computed if c < s]
            options = [profile.reuse_error[k][s][before[-1]]]
            if len(before) > 1:
                options.append(profile.forecast_error[k][s][before[-1]][before[-2]])
            total += weights[s] * min(options)
    return total


def test_auto_planner_finds_the_least_error_schedule_a_brute_force_search_finds():
    import itertools

    import numpy as np

    from tempocache.step_cache.planner import plan

    S, edges = 5, [0, 1, 3]
    for seed in range(4):
        rng = np.random.default_rng(seed)
        gap = np.arange(S)[:, None] - np.arange(S)[None]
        reuse = [(np.abs(gap) * rng.uniform(0.5, 2, (S, S))).tolist() for _ in range(2)]
        forecast = [rng.uniform(0, 3, (S, S, S)).tolist() for _ in range(2)]
        profile = tempocache.Profile(model="test", num_steps=S, edges=edges, timesteps=sorted(rng.uniform(0, 1, S), reverse=True),
                                     output_norm=[1.0] * S, reuse_error=reuse, forecast_error=forecast, stack_reuse_error=[],
                                     stack_forecast_error=[], stack_gain=[], teacache_coefficients=[], prompts=[])
        weights = profile.step_weights()
        subsets = [(0, *rest) for n in range(S) for rest in itertools.combinations(range(1, S), n)]
        for budget in (0.4, 0.6, 0.8, 1.0):
            capacity = int(np.floor(budget * S * edges[-1] + 1e-9))
            best = min(
                _schedule_error(profile, edges, [[Action.COMPUTE if s in c else Action.REUSE for s in range(S)] for c in pair], weights)
                for pair in itertools.product(subsets, repeat=2)
                if len(pair[0]) * 1 + len(pair[1]) * 2 <= capacity
            )
            planned = plan(profile, budget)
            used = sum(a is Action.COMPUTE for a in planned[0]) + 2 * sum(a is Action.COMPUTE for a in planned[1])
            assert used <= capacity
            assert _schedule_error(profile, edges, planned, weights) == pytest.approx(best, rel=1e-12, abs=1e-12), (seed, budget)


@pytest.mark.parametrize("name", families.FAMILIES)
def test_zero_shot_auto_keeps_to_its_budget_on_every_family(name):
    fam = tiny(name)
    reference = denoise(fam)
    for budget in (0.5, 0.34):
        pipe = fake_pipe(fam)
        with pytest.warns(UserWarning, match="no profile for .*zero-shot.*calibrate") as warned:
            tempocache.enable(pipe, tempocache.Auto(budget=budget))
        assert len(warned) == 1
        out = denoise(fam, pipe=pipe)
        stats = tempocache.stats(pipe)
        tempocache.disable(pipe)
        assert 0 < stats["compute_fraction"] <= budget + 1e-9 and stats["blocks_forecast"] + stats["blocks_reused"] > 0
        assert not torch.equal(out, reference) and torch.isfinite(out).all()
    assert torch.equal(denoise(fam), reference)


def test_zero_shot_auto_plans_for_each_generations_step_count_and_never_from_its_own_profile(monkeypatch):
    from tempocache.step_cache.policies import auto

    fam = tiny("wan")
    own = dataclasses.replace(profile_for("wan"), fingerprint=tempocache.models.fingerprint(fam.transformer))
    other = dataclasses.replace(profile_for("flux"), fingerprint="another model", auto_schedules={})  # tables only
    seen = []
    monkeypatch.setattr(auto, "registered_profiles", lambda kind: ["own", "other"])
    monkeypatch.setattr(auto.Profile, "load", staticmethod(lambda path: own if path == "own" else other))
    real_prior = auto.prior_profile
    monkeypatch.setattr(auto, "prior_profile", lambda sources, *a: seen.append(sources) or real_prior(sources, *a))
    tempocache.enable(fam.transformer, tempocache.Auto(budget=0.5, zero_shot=True))
    for steps in (STEPS, STEPS[:4], STEPS):
        denoise(fam, steps=steps, context="cond")
        assert tempocache.stats(fam.transformer)["compute_fraction"] <= 0.5
    assert all(sources == [other] for sources in seen) and len(seen) == 2  # planned once per step count
    tempocache.disable(fam.transformer)
    with pytest.raises(ValueError, match="number of denoising steps"):
        tempocache.enable(fam.transformer, tempocache.Auto(budget=0.5, zero_shot=True))
        denoise(fam)  # a bare loop that names no step count
    assert tempocache.stats(fam.transformer)["blocks_computed"] == 0
    with pytest.raises(ValueError, match="profile or zero_shot"):
        tempocache.Auto(budget=0.5, profile=own, zero_shot=True)


def test_zero_shot_auto_carries_the_sources_refined_schedules_to_any_step_count(monkeypatch):
    from tempocache.step_cache.planner import VARIANTS
    from tempocache.step_cache.policies import auto
    from tempocache.step_cache.prior import prior_schedule, segment_edges

    C, R, F = Action.COMPUTE, Action.REUSE, Action.FORECAST
    refined = [C, C, R, C, F, F]  # 3 of 6 steps, the last at 3/5 of the trajectory, forecast after it

    def source(schedule, edges=(0, 4)):
        return dataclasses.replace(profile_for("flux"), fingerprint="another model", auto_schedules={
            "0.5": {"edges": list(edges), "schedule": [[a.value for a in schedule]], "drift": 0.0}})

    assert prior_schedule([source(refined)], 0.5, N) == [refined]
    for steps in (4, 12, 31):
        (warped,) = prior_schedule([source(refined)], 0.5, steps)
        computed = [s for s, a in enumerate(warped) if a is C]
        assert len(computed) == steps // 2 and computed[0] == 0 and computed == sorted(set(computed))
        assert computed[-1] == round(3 / 5 * (steps - 1))
        assert all(a is F for a in warped[computed[-1] + 1:])
    assert prior_schedule([source(refined, edges=(0, 2, 4))], 0.5, N) is None  # a segment schedule is not carried
    assert prior_schedule([source(refined)], 0.1, N) is None  # below one step
    disagreeing = source([C, C, R, C, R, R])
    assert prior_schedule([source(refined), disagreeing], 0.5, N) == [[C, C, R, C, R, R]]  # a tie reuses
    assert prior_schedule([source(refined)] * 2 + [disagreeing], 0.5, N) == [refined]  # the majority

    fam = tiny("wan")
    monkeypatch.setattr(auto, "registered_profiles", lambda kind: ["other"])
    monkeypatch.setattr(auto.Profile, "load", staticmethod(lambda path: source(refined)))
    carried = tempocache.Auto(budget=0.5, zero_shot=True).make_policy(fam.transformer)
    carried.check_step(Step(0, N, STEPS[0], "cond"))
    assert carried.edges == [0, num_blocks(fam)] and carried.schedule == [refined]
    planned = tempocache.Auto(budget=0.5, zero_shot=True, variant=VARIANTS[2]).make_policy(fam.transformer)
    planned.check_step(Step(0, N, STEPS[0], "cond"))
    assert planned.edges == segment_edges(num_blocks(fam)) and len(planned.schedule) == len(planned.edges) - 1


def test_policies_keep_their_state_in_typed_per_branch_objects():
    fam = tiny("wan")
    tempocache.enable(fam.transformer, tempocache.TeaCache(threshold=50, coefficients=(1.0, 0.0)))  # reuses steps 1, 2
    denoise(fam, steps=STEPS[:3], context="cond")
    engine = tempocache.step_cache.engine.engine_of(fam.transformer)
    state = engine.branches["cond"].state
    assert type(state).__name__ == "TeaCacheState" and dataclasses.is_dataclass(state)
    assert state.previous is not None and state.accumulated > 0
    residuals = sum(t.numel() * t.element_size() for m in engine.branches["cond"].segments for _, r in m.history for t in r)
    held = state.previous[0].numel() * state.previous[0].element_size() + state.previous[1].numel() * state.previous[1].element_size()
    assert tempocache.stats(fam.transformer)["cache_bytes"] == residuals + held
    assert isinstance(engine.counts, tempocache.Stats)


def test_calibrate_needs_runs_that_return_the_samples():
    fam = tiny("wan")
    with pytest.raises(TypeError, match="must return the generated samples"):
        tempocache.calibrate(types.SimpleNamespace(transformer=fam.transformer), [0],
                             run=lambda p, seed: [denoise(fam, seed=seed)])
    assert not hasattr(fam.transformer, "_tempocache_step_cache")


def test_calibrate_on_a_bare_namespace_with_a_plain_loop():
    fam = tiny("wan")
    profile = tempocache.calibrate(types.SimpleNamespace(transformer=fam.transformer), [0, 1],
                                   run=lambda p, seed: denoise(fam, seed=seed), auto_budgets=(0.5,))
    assert profile.num_steps == N


# ---------------------------------------------------------------------------------------------
# 3. CFG branches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("named", [True, False], ids=["cache_context", "by_order"])
@pytest.mark.parametrize("name", ["wan", "flux"])
def test_cfg_branches_keep_separate_state(name, named):
    fam = tiny(name)
    seeds = {"cond": 0, "uncond": 1}  # different latents and encoder states per branch
    config = tempocache.StaticCache(interval=2, warmup=1)
    reference = branch_loop(fam, seeds, named)
    tempocache.enable(fam.transformer, config)
    both = branch_loop(fam, seeds, named)
    stats = tempocache.stats(fam.transformer)
    tempocache.disable(fam.transformer)
    assert stats["generations"] == 1 and stats["calls"] == 2 * N
    assert stats["blocks_reused"] == 2 * 2 * num_blocks(fam)
    for branch, seed in seeds.items():
        tempocache.enable(fam.transformer, config)
        alone = branch_loop(fam, {branch: seed}, named)[branch]
        tempocache.disable(fam.transformer)
        assert torch.equal(both[branch], alone), branch
        assert not torch.equal(both[branch], reference[branch])


def _cfg_loop(fam, record: dict, guidance: float = 3.0):
    """Real CFG: both branches see the same latent; uncond gets other encoder states."""
    x = fam.inputs(1, 8, STEPS[0], 0)["hidden_states"]
    for i, t in enumerate(STEPS):
        kwargs = fam.inputs(1, 8, t, 0)
        kwargs["hidden_states"] = x
        uncond_kwargs = dict(kwargs, encoder_hidden_states=fam.inputs(1, 8, t, 1)["encoder_hidden_states"])
        cond = call(fam, kwargs, "cond", i)
        uncond = call(fam, uncond_kwargs, "uncond", i)
        record["cond"].append(cond)
        record["uncond"].append(uncond)
        x = x - 0.1 * (uncond + guidance * (cond - uncond))
    return x


def test_cfg_reuse_skips_uncond_calls_with_the_stored_difference():
    fam = tiny("wan")
    plain = {"cond": [], "uncond": []}
    reference = _cfg_loop(fam, plain)
    tempocache.enable(fam.transformer, tempocache.CFGReuse(interval=2))  # warmup 2: uncond skipped at steps 3, 5
    cached = {"cond": [], "uncond": []}
    out = _cfg_loop(fam, cached)
    stats = tempocache.stats(fam.transformer)
    tempocache.disable(fam.transformer)
    assert stats["skipped_calls"] == 2 and stats["calls"] == 2 * N and stats["full_calls"] == 2 * N - 2
    assert stats["blocks_reused"] == 2 * num_blocks(fam) and stats["blocks_computed"] == (2 * N - 2) * num_blocks(fam)
    for i in range(3):  # nothing skipped yet: the same trajectory as without the cache
        assert torch.equal(cached["cond"][i], plain["cond"][i]) and torch.equal(cached["uncond"][i], plain["uncond"][i])
    for i in (3, 5):
        expected = cached["cond"][i] + (cached["uncond"][i - 1] - cached["cond"][i - 1])
        assert torch.equal(cached["uncond"][i], expected), i
    assert not torch.equal(out, reference)


def test_cfg_reuse_needs_named_calls():
    fam = tiny("wan")
    tempocache.enable(fam.transformer, tempocache.CFGReuse())
    with pytest.raises(ValueError, match=r"cache_context\('cond' / 'uncond'\).*'call0'"):
        denoise(fam)
    assert tempocache.stats(fam.transformer)["blocks_computed"] == 0
    with pytest.raises(ValueError, match="'other'"):
        denoise(fam, context="other")
    assert tempocache.stats(fam.transformer)["blocks_computed"] == 0


# ---------------------------------------------------------------------------------------------
# 4. Bad input: clear errors, before any compute
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: tempocache.StaticCache(intervall=2),
    lambda: tempocache.Auto(budgett=0.3),
    lambda: tempocache.FirstBlockCache(treshold=0.1),
    lambda: tempocache.DBCache(fn=1, bn=1, thresh=0.1),
    lambda: tempocache.TaylorSeer(orders=2),
    lambda: tempocache.CFGReuse(every=2),
], ids=["StaticCache", "Auto", "FirstBlockCache", "DBCache", "TaylorSeer", "CFGReuse"])
def test_unknown_config_field_is_a_type_error(make):
    with pytest.raises(TypeError, match="unexpected keyword"):
        make()


@pytest.mark.parametrize("make, field", [
    (lambda: tempocache.Auto(budget=0), "budget"),
    (lambda: tempocache.Auto(budget=1.5), "budget"),
    (lambda: tempocache.Auto(budget=float("nan")), "budget"),
    (lambda: tempocache.ERTACache(budget=0), "budget"),
    (lambda: tempocache.FirstBlockCache(threshold=-1), "threshold"),
    (lambda: tempocache.TeaCache(threshold=-0.1), "threshold"),
    (lambda: tempocache.TemporalDeltaCache(threshold=-0.5), "threshold"),
    (lambda: tempocache.GatedTaylorSeer(threshold=-1), "threshold"),
    (lambda: tempocache.TaylorSeer(order=3), "order"),
    (lambda: tempocache.StaticCache(interval=0), "interval"),
    (lambda: tempocache.StaticCache(interval=1.5), "interval"),
    (lambda: tempocache.DBCache(fn=0), "fn"),
    (lambda: tempocache.DeltaDiT(boundary=2.0), "boundary"),
    (lambda: tempocache.CFGReuse(warmup=0), "warmup"),
    (lambda: tempocache.DeltaDiT(num_steps=0), "num_steps"),
    (lambda: tempocache.TeaCache(coefficients="abc"), "coefficients"),
    (lambda: tempocache.TeaCache(coefficients=()), "coefficients"),
    (lambda: tempocache.TeaCache(coefficients=(float("nan"),)), "coefficients"),
    (lambda: tempocache.Auto(variant=(1, 2)), "variant must be one of"),
])
def test_out_of_range_settings_are_value_errors(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_dbcache_needs_a_block_to_cache_and_leaves_the_model_untouched():
    fam = tiny("wan")
    reference = denoise(fam)
    for fn, bn in ((2, 2), (4, 0), (3, 1)):
        with pytest.raises(ValueError, match=r"fn \+ bn"):
            tempocache.enable(fam.transformer, tempocache.DBCache(fn=fn, bn=bn))
        assert not hasattr(fam.transformer, "_tempocache_step_cache")
    assert torch.equal(denoise(fam), reference)
    tempocache.enable(fam.transformer, tempocache.DBCache(fn=2, bn=1, threshold=0))  # 1 block left to cache: fine
    assert torch.equal(denoise(fam), reference)


def test_a_config_class_or_a_wrong_profile_is_refused_naming_what_to_pass(tmp_path):
    fam = tiny("wan")
    with pytest.raises(TypeError, match=r"got the class StaticCache: pass StaticCache\(\)"):
        tempocache.enable(fam.transformer, tempocache.StaticCache)
    not_json = tmp_path / "notes.json"
    not_json.write_text("my notes")
    with pytest.raises(ValueError, match="notes.json' is not a step-cache profile"):
        tempocache.enable(fam.transformer, tempocache.Auto(budget=0.5, profile=not_json))
    with pytest.raises(FileNotFoundError, match="no step-cache profile at"):
        tempocache.enable(fam.transformer, tempocache.Auto(budget=0.5, profile=tmp_path / "missing.json"))
    with pytest.raises(TypeError, match="Profile or the path of its JSON, got dict"):
        tempocache.enable(fam.transformer, tempocache.Auto(budget=0.5, profile={"budget": 0.5}))
    with pytest.raises(ValueError, match="measured on another model .*tempocache.calibrate"):
        tempocache.enable(fam.transformer, tempocache.Auto(budget=0.5, profile=profile_for("flux")))
    assert not hasattr(fam.transformer, "_tempocache_step_cache")


def test_calibrate_refuses_a_string_of_prompts_and_runs_that_do_not_repeat():
    fam = tiny("wan")
    pipe = types.SimpleNamespace(transformer=fam.transformer)
    with pytest.raises(TypeError, match=r"pass \['a red cat'\]"):
        tempocache.calibrate(pipe, "a red cat", run=lambda p, prompt: denoise(fam))
    seeds = iter(range(100))
    with pytest.raises(ValueError, match="deterministic runs"):
        tempocache.calibrate(pipe, [0], run=lambda p, prompt: denoise(fam, seed=next(seeds)), auto_budgets=())
    for bad in ({"segments": 0}, {"auto_budgets": (1.5,)}, {"refine_runs": -1}):
        runs = []
        with pytest.raises(ValueError, match=next(iter(bad))[:-1]):
            tempocache.calibrate(pipe, [0], run=lambda p, prompt: runs.append(prompt) or denoise(fam), **bad)
        assert runs == []  # before any compute


def test_enable_twice_and_not_enabled_are_runtime_errors():
    fam = tiny("wan")
    pipe = fake_pipe(fam)
    for op in (tempocache.disable, tempocache.stats, tempocache.reset):
        with pytest.raises(RuntimeError, match="not enabled"):
            op(fam.transformer)
    tempocache.enable(pipe, tempocache.StaticCache())
    for target in (pipe, fam.transformer):
        with pytest.raises(RuntimeError, match="already enabled"):
            tempocache.enable(target, tempocache.FirstBlockCache())
    assert tempocache.stats(fam.transformer)["policy"] == "StaticCache"  # the first one is still in place
    tempocache.disable(fam.transformer)
    with pytest.raises(RuntimeError, match="not enabled"):
        tempocache.disable(pipe)


def test_enable_rejects_what_it_cannot_cache():
    class NotADiffusionTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, hidden_states, timestep):
            return self.proj(hidden_states)

    model = NotADiffusionTransformer()
    with pytest.raises(TypeError, match="NotADiffusionTransformer"):
        tempocache.enable(model, tempocache.StaticCache())
    assert not hasattr(model, "_tempocache_step_cache")
    x = torch.randn(2, 4)
    assert torch.equal(model(x, 1.0), model.proj(x))
    with pytest.raises(TypeError, match="config"):
        tempocache.enable(tiny("wan").transformer, {"interval": 2})
    with pytest.raises(TypeError, match="transformer"):
        tempocache.enable(object(), tempocache.StaticCache())


def test_auto_step_count_must_match_its_profile():
    fam = tiny("wan")
    with pytest.raises(ValueError, match="below one full step"):  # 0.1 of 6 steps: not even the first one
        tempocache.enable(fam.transformer, tempocache.Auto(budget=0.1, profile=profile_for("wan")))
    assert not hasattr(fam.transformer, "_tempocache_step_cache")
    tempocache.enable(fam.transformer, tempocache.Auto(budget=0.5, profile=profile_for("wan")))
    with pytest.raises(ValueError, match=r"made for 6 steps.*has 4.*calibrate"):
        denoise(fam, steps=STEPS[:4], context="cond")
    tempocache.disable(fam.transformer)
    tempocache.enable(fam.transformer, tempocache.ERTACache(budget=0.5, profile=profile_for("wan")))
    with pytest.raises(ValueError, match="calibrate"):
        denoise(fam, steps=STEPS[:4], context="cond")


def test_auto_step_count_mismatch_fails_before_any_compute():
    fam = tiny("wan")
    tempocache.enable(fam.transformer, tempocache.Auto(budget=0.5, profile=profile_for("wan")))
    kwargs = fam.inputs(1, 8, STEPS[0], 0)
    with pytest.raises(ValueError, match="calibrate"):
        call(fam, kwargs, "cond", 0, steps=4)
    assert tempocache.stats(fam.transformer)["blocks_computed"] == 0


# ---------------------------------------------------------------------------------------------
# 5. reset
# ---------------------------------------------------------------------------------------------


def test_reset_clears_cache_and_counters():
    fam = tiny("wan")
    config = tempocache.StaticCache(interval=2, warmup=1)
    tempocache.enable(fam.transformer, config)
    denoise(fam, seed=0)
    before = tempocache.stats(fam.transformer)
    assert before["cache_bytes"] > 0 and before["peak_cache_bytes"] > 0 and before["calls"] == N
    tempocache.reset(fam.transformer)
    after = tempocache.stats(fam.transformer)
    assert after["cache_bytes"] == 0 and after["peak_cache_bytes"] == 0
    for key in ("calls", "full_calls", "skipped_calls", "generations", "blocks_computed", "blocks_reused",
                "blocks_forecast", "block_calls"):
        assert after[key] == 0, key
    assert after["compute_fraction"] == 1.0 and after["policy"] == "StaticCache"
    # After a reset mid-generation, the next call starts over: same as a fresh cache.
    denoise(fam, seed=1, steps=STEPS[:3])
    tempocache.reset(fam.transformer)
    again = denoise(fam, seed=1)
    assert tempocache.stats(fam.transformer)["generations"] == 1
    tempocache.disable(fam.transformer)
    tempocache.enable(fam.transformer, config)
    assert torch.equal(again, denoise(fam, seed=1))


def test_stats_survive_the_end_of_call_reset_of_diffusers_pipelines():
    fam = tiny("wan")
    tempocache.enable(fam.transformer, tempocache.StaticCache(interval=2, warmup=1))
    denoise(fam)
    fam.transformer._reset_stateful_cache()  # what DiffusionPipeline.maybe_free_model_hooks() does
    stats = tempocache.stats(fam.transformer)
    assert stats["cache_bytes"] == 0  # freeing the cache is right
    assert stats["calls"] == N and stats["blocks_reused"] == 2 * num_blocks(fam)


@pytest.mark.parametrize("name", ["wan", "flux", "hunyuan_video"])
def test_generic_fallback_finds_blocks_and_learns_their_layout(name, monkeypatch):
    """With the family table emptied, the generic search finds the block lists and each block's output layout."""
    from tempocache.models import families as known

    fam = tiny(name)
    monkeypatch.setattr(known, "FAMILIES", {})
    reference = denoise(fam)
    tempocache.enable(fam.transformer, tempocache.StaticCache(interval=1))
    assert tempocache.stats(fam.transformer)["family"] == "generic"
    assert torch.equal(denoise(fam), reference)
    tempocache.disable(fam.transformer)
    tempocache.enable(fam.transformer, tempocache.FirstBlockCache(threshold=10.0))
    out = denoise(fam)
    stats = tempocache.stats(fam.transformer)
    tempocache.disable(fam.transformer)
    assert stats["blocks_reused"] == (N - 1) * (num_blocks(fam) - 1)
    assert torch.isfinite(out).all() and out.shape == reference.shape


def test_auto_comparison_reads_each_policy_frontier_at_autos_compute():
    from tempocache.eval.cache_quality import auto_comparison

    def row(policy, compute, psnr, **settings):
        return {"policy": policy, "compute_fraction": compute, "psnr": psnr, "settings": settings}

    result = {"rows": [
        row("full compute", 1.0, 100.0),
        row("Auto", 0.5, 35.0, budget=0.5),
        row("StaticCache", 0.4, 28.0), row("StaticCache", 0.6, 38.0),  # 33 dB at 0.5: Auto wins
        row("TeaCache", 0.3, 30.0), row("TeaCache", 0.7, 44.0),  # 37 dB at 0.5: TeaCache wins
        row("CFGReuse", 0.62, 29.0),  # cannot go as low as 0.5
    ]}
    comparison = auto_comparison(result)
    assert len(comparison["losses"]) == 1 and comparison["losses"][0].startswith("TeaCache")
    assert len(comparison["out_of_reach"]) == 1 and comparison["out_of_reach"][0].startswith("CFGReuse")


def test_auto_sensitive_variant_protects_the_steps_calibrate_found_sensitive():
    from tempocache.step_cache.planner import plan

    profile = dataclasses.replace(profile_for("wan"))
    steps = profile.num_steps
    for fragile in (1, steps - 1):  # an error at this step alone would wreck the sample
        profile.sensitivity = [1e6 if s == fragile else 1.0 for s in range(steps)]
        schedule = plan(profile, 2 / steps, forecast_penalty=float("inf"), whole_stack=True, sensitive=True)[0]
        assert [s for s, a in enumerate(schedule) if a == Action.COMPUTE] == [0, fragile]
    profile.sensitivity = []  # not measured: the same plan either way
    assert plan(profile, 0.5, 1.0, True, sensitive=True) == plan(profile, 0.5, 1.0, True, sensitive=False)


def test_frontier_table_gives_each_policys_best_psnr_under_each_cap():
    from tempocache.eval.cache_quality import format_frontier

    rows = [{"policy": "full compute", "compute_fraction": 1.0, "psnr": 100.0},
            {"policy": "StaticCache", "compute_fraction": 0.3, "psnr": 28.0},
            {"policy": "StaticCache", "compute_fraction": 0.55, "psnr": 36.0},
            {"policy": "StaticCache", "compute_fraction": 0.45, "psnr": 31.0}]
    table = format_frontier({"rows": rows}, caps=(0.25, 0.5, 0.7)).splitlines()
    assert table[2] == "| StaticCache | - | 31.0 (0.45) | 36.0 (0.55) |" and len(table) == 3


def test_cache_quality_refuses_unknown_policies_before_any_sampling():
    from tempocache.eval.cache_quality import cache_quality

    with pytest.raises(ValueError, match="known: StaticCache"):
        cache_quality("shapes-t2i", captions=2, policies=["NoSuchCache"])


@pytest.mark.parametrize("interval", [2, 100], ids=["reuse every other step", "compute only the first step"])
@pytest.mark.parametrize("regional", [False, True], ids=["whole model", "each block"])
def test_an_enabled_transformer_compiles_without_recompiling_across_steps(interval, regional):
    from torch._dynamo.utils import counters

    fam = tiny("wan")
    tempocache.enable(fam.transformer, tempocache.StaticCache(interval=interval))
    eager = denoise(fam)
    torch._dynamo.reset()
    counters.clear()
    if regional:
        fam.transformer.compile_repeated_blocks()  # diffusers' regional compilation
        compiled = fam
    else:
        compiled = types.SimpleNamespace(transformer=torch.compile(fam.transformer), inputs=fam.inputs)
    denoise(compiled)
    graphs = counters["stats"]["unique_graphs"]
    again = [denoise(compiled) for _ in range(2)]
    assert counters["stats"]["unique_graphs"] == graphs  # later steps and generations reuse the first one's graphs
    assert all("torch.compiler.disable" in reason for reason in counters["graph_break"])  # only at its bookkeeping
    assert torch.allclose(again[-1], eager, atol=1e-5)
    torch._dynamo.reset()
