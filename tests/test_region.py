"""RegionE: the edited tokens computed alone attend to the whole sequence's keys and values as a full step does; a
global edit runs in full, bit for bit; the schedule and the model are checked before any compute."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import tempocache as tc
from tempocache.reference.models import TEXT_DIM, _pack
from tempocache.region import RegionE, edited_tokens
from tempocache.region.partition import token_similarity
from tempocache.region.attention import RegionAttention, RegionCall, RegionKV
from test_edits import tiny_flux
from test_editing import sources, tiny_editor

STEPS = 12
SCHEDULE = dict(partition_step=3, refresh_steps=(7,), final_steps=2)


def edit(pipe, config: RegionE | None = None, **kwargs) -> np.ndarray:
    images, instructions = sources(2)
    if config is None:
        return pipe(instructions, num_inference_steps=STEPS, image=images, seed=1, **kwargs).frames
    with tc.enabled(pipe, config):
        out = pipe(instructions, num_inference_steps=STEPS, image=images, seed=1, **kwargs).frames
        pipe.last_stats = tc.stats(pipe)
    return out


def test_edited_tokens_alone_attend_as_the_full_step_does(one_thread):
    transformer, g = tiny_flux(), torch.Generator().manual_seed(0)
    x, reference = (torch.randn(2, 3, 1, 8, 8, generator=g) for _ in range(2))
    tokens, ids = _pack(x, 0)
    reference_tokens, reference_ids = _pack(reference, 1)
    hidden, img_ids = torch.cat([tokens, reference_tokens], 1), torch.cat([ids, reference_ids])
    text = torch.randn(2, 5, TEXT_DIM, generator=g)
    args = dict(encoder_hidden_states=text, pooled_projections=text.mean(1), timestep=torch.tensor([0.4, 0.4]),
                txt_ids=torch.zeros(5, 3), return_dict=False)
    call = RegionCall()
    transformer.set_attn_processor({name: RegionAttention(call, i) for i, name in enumerate(transformer.attn_processors)})
    call.mode, call.kv = "record", RegionKV()
    with torch.no_grad():
        full = transformer(hidden_states=hidden, img_ids=img_ids, **args)[0]
        rows = torch.stack([torch.tensor([0, 5, 9, 15]), torch.tensor([2, 3, 3, 12])])  # each sample its own, a repeat
        call.mode = "region"
        call.positions = torch.cat([torch.arange(5).expand(2, -1), 5 + rows], 1)
        alone = transformer(hidden_states=hidden.gather(1, rows[..., None].expand(-1, -1, 12)), img_ids=img_ids[rows[0]],
                            **args)[0]
    torch.testing.assert_close(alone, full.gather(1, rows[..., None].expand(-1, -1, full.shape[-1])), atol=1e-5, rtol=1e-4)


def test_a_global_edit_runs_in_full_bit_for_bit_and_disable_restores_the_model(one_thread):
    pipe = tiny_editor()
    base = edit(pipe)
    assert np.array_equal(edit(pipe, RegionE(threshold=1.0, **SCHEDULE)), base)  # every token edited: the fallback
    stats = pipe.last_stats
    assert stats["global_fallbacks"] == 1 and stats["compute_fraction"] == 1.0 and stats["region_calls"] == 0
    assert np.array_equal(edit(pipe), base)


def test_edited_only_steps_compute_a_fraction_and_generations_do_not_leak(one_thread):
    pipe = tiny_editor()
    base = edit(pipe)
    config = RegionE(threshold=-1.0, **SCHEDULE)  # nothing edited: one token per image computed at edited-only steps
    out = edit(pipe, config)
    stats = pipe.last_stats
    assert stats["region_calls"] == 2 * (STEPS - 3 - 1 - 1 - 2) and stats["full_calls"] == 2 * (3 + 1 + 1 + 2)
    assert stats["compute_fraction"] < 0.6 and stats["edited_fraction"] == [0.0]
    assert np.isfinite(out).all() and not np.array_equal(out, base)
    with tc.enabled(pipe, config):  # two edits in a row equal two fresh ones
        images, instructions = sources(2)
        first = pipe(instructions, num_inference_steps=STEPS, image=images, seed=1).frames
        pipe(instructions[::-1], num_inference_steps=STEPS, image=images.flip(0), seed=3)
        second = pipe(instructions, num_inference_steps=STEPS, image=images, seed=1).frames
    assert np.array_equal(first, out) and np.array_equal(second, out)
    batched = edit(pipe, config, batch_cfg=True)  # both branches in one call share each image's mask
    np.testing.assert_allclose(batched, out, atol=1e-4)


class HostReads(TorchFunctionMode):
    """Counts the tensor values read back to the host (each a device sync on a GPU)."""

    READS = {"__float__", "__bool__", "__int__", "item", "tolist"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


def test_past_the_first_and_partition_steps_regione_reads_nothing_back_from_the_device(one_thread):
    pipe, images, instructions = tiny_editor(), *sources(2)

    def reads(steps: int, config: RegionE | None) -> int:
        with HostReads() as mode, tc.enabled(pipe, config) if config else contextlib.nullcontext():
            pipe(instructions, num_inference_steps=steps, image=images, seed=1)
        return mode.count

    added = [reads(n, RegionE(**SCHEDULE)) - reads(n, None) for n in (STEPS, STEPS + 6)]
    assert added[0] == added[1]  # six more edited-only steps, no more reads


def test_the_partition_marks_what_differs_and_cleans_lone_tokens():
    reference = torch.ones(1, 64, 12)
    estimate = reference.clone()
    block = torch.zeros(8, 8, dtype=torch.bool)
    block[2:5, 2:5] = True
    estimate[0, block.flatten()] = -1
    lone = 7 * 8 + 7
    estimate[0, lone] = -1
    raw = edited_tokens(token_similarity(estimate, reference), 0.9, (8, 8), clean=False)
    assert raw[0, block.flatten()].all() and raw[0, lone] and raw.sum() == 10
    clean = edited_tokens(token_similarity(estimate, reference), 0.9, (8, 8)).reshape(8, 8)
    # the block eroded to its centre and grown by two each way, the lone token gone
    assert clean[1:6, 1:6].all() and clean.sum() == 25 and not clean[7, 7]


@pytest.mark.parametrize("knobs, message", [
    (dict(partition_step=-1), "partition_step must be a step index"),
    (dict(threshold=1.5), "threshold is a cosine similarity"),
    (dict(max_edited=0.0), "max_edited must be above 0"),
    (dict(velocity_threshold=2.0), "velocity_threshold"),
    (dict(velocity_threshold=0.1), "needs gamma"),
    (dict(refresh_steps=(5, 4)), "increasing step indices"),
    (dict(partition_step=4, refresh_steps=(5,)), "with an edited-only step between"),
])
def test_bad_knobs_are_refused(knobs, message):
    with pytest.raises(ValueError, match=message):
        RegionE(**knobs)


def test_a_schedule_that_does_not_fit_is_refused_before_any_compute(monkeypatch):
    pipe = tiny_editor()
    calls = []
    monkeypatch.setattr(pipe.transformer, "forward", lambda *a, **k: calls.append(1))
    for config, message in ((RegionE(partition_step=10, refresh_steps=()), "partition_step 10 is outside the schedule"),
                            (RegionE(partition_step=2, refresh_steps=(9,)), "refresh_steps .* outside the schedule"),
                            (RegionE(gamma=(1.0,) * 5, **SCHEDULE), "gamma has 5 factors for 12 steps")):
        with tc.enabled(pipe, config), pytest.raises(ValueError, match=message):
            edit(pipe)
    assert not calls


def test_regione_needs_an_editor_and_does_not_stack_on_a_step_cache():
    from tempocache.reference.models import make_scheduler, make_tokenizer
    from tempocache.reference.pipeline import ShapesPipeline
    from tempocache.reference.text import WordEncoder

    generator = ShapesPipeline(tiny_flux(), WordEncoder(len(make_tokenizer().words), 20, TEXT_DIM), make_scheduler())
    with pytest.raises(ValueError, match="no reference tokens"):
        tc.enable(generator, RegionE())
    with pytest.raises(TypeError, match="not on a bare transformer"):
        tc.enable(generator.transformer, RegionE())
    pipe = tiny_editor()
    with tc.enabled(pipe, tc.FirstBlockCache(threshold=0.1)), pytest.raises(RuntimeError, match="does not stack"):
        tc.enable(pipe, RegionE())
    with tc.enabled(pipe, RegionE()), pytest.raises(RuntimeError, match="does not stack"):
        tc.enable(pipe, tc.FirstBlockCache(threshold=0.1))


def test_the_velocity_cache_reuses_scaled_velocities_within_its_threshold(one_thread):
    from tempocache.region import fit_gamma

    pipe = tiny_editor()
    gamma = fit_gamma(pipe, count=3, steps=STEPS)
    assert len(gamma) == STEPS and gamma[0] == 1.0 and all(g > 0 for g in gamma)
    base = edit(pipe, RegionE(threshold=-1.0, **SCHEDULE))
    cached = edit(pipe, RegionE(threshold=-1.0, velocity_threshold=0.5, gamma=(0.9,) * STEPS, **SCHEDULE))
    stats = pipe.last_stats
    assert stats["reused_calls"] > 0 and stats["region_calls"] + stats["reused_calls"] == 2 * 5
    assert not np.array_equal(cached, base) and np.isfinite(cached).all()
    edit(pipe, RegionE(threshold=-1.0, velocity_threshold=0.01, gamma=(0.9,) * STEPS, **SCHEDULE))
    assert pipe.last_stats["reused_calls"] == 0  # 0.9 is a change of 0.1: past a threshold of 0.01, so computed


def test_regione_runs_on_quantized_linears(one_thread):
    pipe = tiny_editor()
    tc.quantize(pipe, tc.W8A8("int8"))
    base = edit(pipe)
    out = edit(pipe, RegionE(threshold=-1.0, **SCHEDULE))
    assert pipe.last_stats["region_calls"] > 0 and np.isfinite(out).all() and not np.array_equal(out, base)
    assert np.array_equal(edit(pipe, RegionE(threshold=1.0, **SCHEDULE)), base)  # the fallback: the quantized edit


def test_calibrate_fits_regione_gamma_for_an_editor_only(tmp_path, monkeypatch, capsys, one_thread):
    import json

    import tempocache.generation as generation
    from tempocache.cli import main

    monkeypatch.setattr(generation, "load_pipeline", lambda *a, **k: tiny_editor())
    out = tmp_path / "gamma.json"
    assert main(["calibrate", "--model", "shapes-edit", "--regione", "--prompts", "2", "--steps", "6", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["steps"] == 6 and len(saved["gamma"]) == 6 and saved["gamma"][0] == 1.0
    RegionE(partition_step=1, refresh_steps=(), final_steps=1, velocity_threshold=0.1, gamma=tuple(saved["gamma"])).check(6)
    assert main(["calibrate", "--model", "shapes-t2i", "--regione", "--out", str(tmp_path / "x.json")]) == 2
    assert "not an editor" in capsys.readouterr().err


def test_regione_on_a_context_parallel_transformer_is_refused_enabled_before_or_after():
    from diffusers import ContextParallelConfig, ParallelConfig

    split = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))  # as enable_parallelism
    pipe = tiny_editor()  # records it on a model (which needs ranks to run)
    pipe.transformer._parallel_config = split
    with pytest.raises(NotImplementedError, match="takes no part in diffusers' context parallelism"):
        tc.enable(pipe, RegionE(**SCHEDULE))
    pipe.transformer._parallel_config = None
    with tc.enabled(pipe, RegionE(**SCHEDULE)):
        pipe.transformer._parallel_config = split
        with pytest.raises(NotImplementedError, match="takes no part"):
            edit(pipe)
        pipe.transformer._parallel_config = None
