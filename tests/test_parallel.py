"""The step cache under diffusers' context parallelism: CPU processes (gloo), each a rank of one generation split by
sequence with Ulysses attention (`enable_parallelism(config=ContextParallelConfig(ulysses_degree=...))`)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tempocache
from diffusers import WanTransformer3DModel
from families import TEXT_DIM, run, tiny

TIMESTEPS = torch.linspace(999, 100, 8)
TIMEOUT = 240  # seconds a spawn of ranks may take
POLICIES = {
    "FirstBlockCache": lambda: tempocache.FirstBlockCache(threshold=0.2),
    "FirstBlockCache(0.3)": lambda: tempocache.FirstBlockCache(threshold=0.3),  # the tiny FLUX changes more a step
    "TeaCache": lambda: tempocache.TeaCache(threshold=0.5, coefficients=(1.0, 0.0)),
    "GatedTaylorSeer": lambda: tempocache.GatedTaylorSeer(threshold=0.3),
    "W8A8 + FP8 attention": lambda: tempocache.W8A8("fp8", attention=True),
    "TimestepAdaptive": lambda profile: tempocache.TimestepAdaptive(budget=0.5, format="int8",
                                                                    profile=tempocache.QuantProfile.load(profile)),
}


def generation(family, timesteps: torch.Tensor, moving: slice = slice(None)) -> torch.Tensor:
    """Euler-like steps over `timesteps`; only the latent frames `moving` of a video move (the rest stay as drawn)."""
    inputs = family.inputs(size=8)
    x, outputs = inputs["hidden_states"].clone(), []
    for t in timesteps:
        timestep = family.inputs(size=8, timestep=float(t))["timestep"]  # on the family's scale
        with torch.no_grad():
            v = family.transformer(**{**inputs, "hidden_states": x, "timestep": timestep}, return_dict=False)[0]
        x[:, :, moving] -= 0.1 * v[:, :, moving]
        outputs.append(v)
    return torch.stack(outputs)


def model(name: str, heads: int = 2):
    """The tiny model of the family tests, or (Wan) the same with `heads` attention heads of 16 (4 ranks need 4)."""
    family = tiny(name)
    if heads != family.transformer.config.num_attention_heads:
        torch.manual_seed(0)
        family.transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=4, rope_max_seq_len=32).eval()
    return family


def accelerate(transformer, config):
    """A step cache enabled, or quantization applied, on `transformer`; what reads its stats."""
    if isinstance(config, tempocache.StepCacheConfig):
        tempocache.enable(transformer, config)
        return tempocache.stats
    tempocache.quantize(transformer, config)
    return tempocache.quant_stats


def record_blocks(family) -> list[int]:
    """A list the transformer's blocks append their index to each time one runs: the cache's decisions, in order."""
    ran: list[int] = []
    blocks = [block for name in family.block_lists for block in getattr(family.transformer, name)]
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: ran.append(i))
    return ran


def _case(name: str, policy, order: str, heads: int, world: int, moving: slice = slice(None),
          timesteps=TIMESTEPS) -> tuple:
    """One generation on a fresh transformer split over the group's ranks: (output, every rank's block trace,
    stats), or the error's repr."""
    from diffusers import ContextParallelConfig

    try:
        family = model(name, heads)
        parallel = ContextParallelConfig(ulysses_degree=world)
        if order == "parallel first":
            family.transformer.enable_parallelism(config=parallel)
        stats = accelerate(family.transformer, policy)
        if order == "cache first":
            family.transformer.enable_parallelism(config=parallel)
        ran = record_blocks(family)
        out = generation(family, timesteps, moving)
    except ValueError as error:
        return repr(error)
    every = [None] * world
    dist.all_gather_object(every, ran)
    result = stats(family.transformer)
    if isinstance(policy, tempocache.StepCacheConfig):  # disabled, the split model computes as it did before
        tempocache.disable(family.transformer)
        with torch.no_grad():
            result["after_disable"] = family.transformer(**family.inputs(size=8), return_dict=False)[0].numpy()
    return out.numpy(), every, result  # by value: the process ends


def _rank(rank: int, world: int, port: int, cases: list[tuple], queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.accelerator.device_count = lambda: 1  # diffusers places a rank on device rank % count: 0 on a CPU
        results = [_case(name, POLICIES[policy](*args), order, heads, world) for name, policy, order, heads, *args
                   in cases]
        queue.put((rank, results, _forced(world) if world == 2 else None))
    except BaseException as error:  # the parent reports it instead of waiting on a queue that stays empty
        queue.put((rank, repr(error), None))
        raise
    finally:
        dist.destroy_process_group()


def _forced(world: int) -> tuple:
    """A generation in which the ranks' own signals disagree: the timestep nearly still and only the second latent
    frame (the second rank's tokens) moving. Its first-block signals are recorded as each rank alone sees them (its
    shard) and as decided on (over every shard) with a threshold of 0 (every step computed); it then runs again
    with a threshold between the decided value and the larger own value at the first step where that puts the
    ranks apart (every decided value before it above the threshold, so that the run is the same up to there)."""
    from tempocache.step_cache.policies import first_block

    records, relative_change = [], first_block.relative_change
    still = torch.linspace(999, 996, 8)

    def recorded(a, b, group=None):
        records.append((relative_change(a, b), relative_change(a, b, group)))
        return records[-1][1]

    first_block.relative_change = recorded
    try:
        _case("wan", tempocache.FirstBlockCache(threshold=0.0), "parallel first", 2, world, slice(1, 2), still)
    finally:
        first_block.relative_change = relative_change
    every = [None] * world
    dist.all_gather_object(every, records)
    decided = [d for _, d in every[0]]
    for step, signals in enumerate(zip(*every)):
        threshold = (decided[step] + max(own for own, _ in signals)) / 2
        if min(own for own, _ in signals) < decided[step] < threshold and min(decided[:step], default=1) > threshold:
            break
    else:
        raise AssertionError("no step at which the ranks' own signals fall either side of a threshold")
    return every, threshold, step, _case("wan", tempocache.FirstBlockCache(threshold=threshold), "parallel first", 2,
                                         world, slice(1, 2), still)


def in_parallel(world: int, target, *args) -> list[tuple]:
    """`target(rank, world, port, *args, queue)` in `world` spawned processes; what each put on the queue, by rank
    (an error as its repr)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=target, args=(rank, world, port, *args, queue), daemon=True)
                 for rank in range(world)]
    for p in processes:
        p.start()
    try:  # ranks that wait on each other forever fail the test here, not the suite
        return sorted((queue.get(timeout=TIMEOUT) for _ in processes), key=lambda r: r[0])
    finally:
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


def succeeded(results: list[tuple]) -> list[tuple]:
    failed = [r[1] for r in results if isinstance(r[1], str)]
    assert not failed, failed
    return results


def single(name: str, policy: str, heads: int, *args) -> tuple[torch.Tensor, list[int], dict]:
    family = model(name, heads)
    stats = accelerate(family.transformer, POLICIES[policy](*args))
    ran = record_blocks(family)
    out = generation(family, TIMESTEPS)
    return out, ran, stats(family.transformer)


CASES = {2: [("wan", "FirstBlockCache", "parallel first", 2), ("wan", "FirstBlockCache", "cache first", 2),
             ("wan", "TeaCache", "parallel first", 2), ("wan", "GatedTaylorSeer", "parallel first", 2),
             ("flux", "FirstBlockCache(0.3)", "parallel first", 2), ("flux", "FirstBlockCache(0.3)", "cache first", 2)],
         4: [("wan", "FirstBlockCache", "parallel first", 4), ("wan", "FirstBlockCache", "cache first", 2),
             ("wan", "FirstBlockCache", "parallel first", 2)]}


@pytest.fixture(scope="module")
def quant_profile(tmp_path_factory) -> str:
    """TimestepAdaptive's profile of the tiny Wan, fitted in one process as test_quant fits it."""
    from test_quant import profile_for

    return str(profile_for("wan", "int8").save(tmp_path_factory.mktemp("profile") / "wan.json"))


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def split(request, quant_profile) -> tuple[int, list[tuple], list[tuple]]:
    """Every case of CASES[world] (and TimestepAdaptive's, with 2) run in one spawn of `world` ranks: (world, the
    cases, each rank's (rank, results, forced))."""
    world = request.param
    cases = CASES[world] + ([("wan", "TimestepAdaptive", "parallel first", 2, quant_profile),
                             ("wan", "TimestepAdaptive", "cache first", 2, quant_profile),
                             ("wan", "W8A8 + FP8 attention", "cache first", 2)] if world == 2 else [])
    return world, cases, succeeded(in_parallel(world, _rank, cases))


def test_a_split_generation_with_a_cache_is_the_single_process_one_and_every_rank_decides_alike(split):
    world, cases, ranks = split
    for i, (name, policy, order, heads, *args) in enumerate(cases):
        if heads % world:
            continue
        expected, expected_ran, expected_stats = single(name, policy, heads, *args)
        if policy == "TimestepAdaptive":  # some layers ran in 8 bits and some not, on every rank alike
            assert 0 < expected_stats["low_precision_share"] < 1
        elif policy.startswith("W8A8"):
            assert expected_stats["attention_fp8_calls"] > 0
        else:
            skipped = expected_stats["blocks_reused"] + expected_stats["blocks_forecast"]
            assert 0 < skipped < expected_stats["block_calls"]  # the cache did skip, and compute
        for _, results, _ in ranks:
            out, every, stats = results[i]
            if policy.startswith("W8A8"):
                # attention's FP8 scales are per tensor, and a rank's tensors hold its share of the heads (Ulysses):
                # the same numerics to within FP8 rounding, not to the bit
                assert stats["attention_fp8_calls"] == expected_stats["attention_fp8_calls"]
                error = (torch.from_numpy(out) - expected).norm() / expected.norm()
                assert error < 0.05, error
                continue
            torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-5, rtol=1e-5)
            assert all(ran == expected_ran for ran in every), (name, policy, order)  # the same blocks, in order
            if policy == "TimestepAdaptive":
                assert stats["low_precision_share"] == expected_stats["low_precision_share"]
            else:  # each rank holds its shard of the residuals (TeaCache's timestep embedding is whole on each)
                assert stats["cache_bytes"] * (world if policy != "TeaCache" else 1) <= expected_stats["cache_bytes"]
                plain = run(model(name, heads), size=8)
                torch.testing.assert_close(torch.from_numpy(stats["after_disable"]), plain, atol=1e-5, rtol=1e-5)


def test_ulysses_over_more_ranks_than_the_heads_divide_is_refused_before_compute(split):
    world, cases, ranks = split
    refused = [i for i, (_, _, _, heads, *_) in enumerate(cases) if heads % world]
    assert refused or world == 2
    for _, results, _ in ranks:
        for i in refused:
            assert isinstance(results[i], str) and f"Ulysses attention over {world} ranks" in results[i]
            assert "has 2, which 4 does not divide; use a ulysses_degree of 2" in results[i]


def test_ranks_whose_own_signals_disagree_decide_alike_on_the_signal_summed_over_them(split):
    world, _, ranks = split
    if world != 2:
        pytest.skip("run with 2 ranks")
    (_, _, (signals, threshold, step, (out, every, stats))), _ = ranks
    own = [rank[step][0] for rank in signals]
    assert min(own) < threshold <= max(own)  # alone, one rank would reuse at that step and the other compute
    assert every[0] == every[1] and stats["blocks_reused"] > 0  # together they decided alike, and did reuse
