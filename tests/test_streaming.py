"""Streaming generation with the bounded KV cache, on a tiny random SkyReels-V2 model (the class of shapes-ar).

Full KV must equal a non-streaming forward over the same frames under the block-causal
mask; a window at least as long as the stream must equal full KV bit for bit; streams must
not leak into each other; bounded policies must hold memory flat.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from diffusers import SkyReelsV2Transformer3DModel

import tempocache
from tempocache import kv
from tempocache.kv.quantized import quantize_frame, quantized_bytes
from tempocache.reference.models import IN_TRAINING, TEXT_DIM, make_scheduler, make_tokenizer
from tempocache.reference.pipeline import ShapesPipeline
from tempocache.reference.text import WordEncoder
from tempocache.streaming import stream

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = IN_TRAINING["shapes-ar"]
PROMPT = "a red circle moves right on a black background"
OTHER = "a blue square moves up on a white background"


def tiny_pipe(seed: int = 0, head_dim: int = 24) -> ShapesPipeline:
    torch.manual_seed(seed)
    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 4, 4), num_attention_heads=2, attention_head_dim=head_dim, in_channels=3, out_channels=3,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
        num_frame_per_block=SPEC.chunk_frames).eval()
    text_encoder = WordEncoder(len(make_tokenizer().words), 20, TEXT_DIM).eval()
    return ShapesPipeline(transformer, text_encoder, make_scheduler())


def chunks(s) -> np.ndarray:
    return np.concatenate(list(s))


@pytest.fixture(scope="module")
def pipe() -> ShapesPipeline:
    return tiny_pipe()


def test_full_kv_streaming_equals_one_block_causal_forward_over_the_same_frames(pipe):
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((kwargs["hidden_states"], kwargs["timestep"], out[0])), with_kwargs=True)
    try:
        list(stream(pipe, PROMPT, frames=3 * SPEC.chunk_frames, steps=2, guidance=2.0))
    finally:
        hook.remove()
    commits = [c for c in calls if not c[1].any()]  # the clean re-encoding passes, at noise level 0
    x, t, streamed = calls[-2]  # the last chunk's last denoising step
    history = torch.cat([c[0] for c in commits[:2]], 2)
    with torch.no_grad():
        full = pipe.transformer(hidden_states=torch.cat([history, x], 2),
                                timestep=torch.cat([torch.zeros_like(history[:, 0, :, 0, 0]), t], 1),
                                encoder_hidden_states=_text(pipe, PROMPT), enable_diffusion_forcing=True,
                                return_dict=False)[0]
    torch.testing.assert_close(streamed, full[:, :, -SPEC.chunk_frames:], atol=1e-5, rtol=1e-4)


def _text(pipe, prompt):
    ids = pipe.tokenizer([prompt])
    return torch.cat([pipe.encode(torch.zeros_like(ids)), pipe.encode(ids)])


@pytest.mark.parametrize("config", [kv.SlidingWindow(frames=12), kv.Sinks(frames=12, sink_frames=2),
                                    kv.Auto(frames=12, memory_frames=12)], ids=["SlidingWindow", "Sinks", "Auto"])
def test_a_window_as_long_as_the_stream_equals_full_kv_bit_for_bit(pipe, config):
    frames = 4 * SPEC.chunk_frames  # the last chunk attends to 12 frames: all of them
    full = chunks(stream(pipe, PROMPT, frames=frames, steps=2))
    assert np.array_equal(chunks(stream(pipe, PROMPT, frames=frames, steps=2, kv=config)), full)


def test_streams_in_a_row_equal_fresh_ones_and_leave_nothing_behind(pipe):
    processors = [b.attn1.processor for b in pipe.transformer.blocks]
    first = chunks(stream(pipe, PROMPT, frames=8, steps=2, seed=0, kv=kv.SlidingWindow(frames=4)))
    interrupted = stream(pipe, OTHER, frames=40, steps=2, seed=5)
    next(interrupted)
    interrupted.close()
    second = chunks(stream(pipe, OTHER, frames=8, steps=2, seed=1))
    fresh = tiny_pipe()
    assert np.array_equal(first, chunks(stream(fresh, PROMPT, frames=8, steps=2, seed=0, kv=kv.SlidingWindow(frames=4))))
    assert np.array_equal(second, chunks(stream(fresh, OTHER, frames=8, steps=2, seed=1)))
    assert [b.attn1.processor for b in pipe.transformer.blocks] == processors
    assert not hasattr(pipe.transformer, "_tempocache_stream")


BOUNDED = {"SlidingWindow": kv.SlidingWindow(frames=8), "Sinks": kv.Sinks(frames=12, sink_frames=3),
           "DeepSink": kv.DeepSink(frames=12), "Participative": kv.Participative(frames=8, recent_frames=4),
           "Sinks int4": kv.Sinks(frames=12, sink_frames=4, quant=kv.KVQuant(bits=4)),
           "Participative int8": kv.Participative(frames=12, quant=kv.KVQuant(bits=8)),
           "TempCache": kv.TempCache(frames=12, keep=0.25), "SoftPrune": kv.SoftPrune(frames=12, kept_frames=4),
           "HeavyHitters": kv.HeavyHitters(frames=12, keep=0.25),
           "Recompute": kv.Recompute(frames=8)}


@pytest.mark.parametrize("config", BOUNDED.values(), ids=BOUNDED)
def test_bounded_policies_hold_memory_flat_over_a_long_stream(pipe, config):
    s = stream(pipe, PROMPT, steps=1, guidance=1.0, kv=config)  # endless
    sizes, held, chunks_read = [], [], 150  # 600 frames: far past every window and the rope table's 64
    for _ in range(chunks_read):
        next(s)
        sizes.append((s.stats()["kv_bytes"], None if s.history is None else s.history.numel()))
        held.append(s.cache.held)
    s.close()
    filled = config.frames // SPEC.chunk_frames
    assert len(set(sizes[filled:])) == 1 and sizes[-1][0] == max(size for size, _ in sizes)
    if not isinstance(config, kv.Recompute):
        assert held[-1][-1] == chunks_read * SPEC.chunk_frames - 1 and len(held[-1]) <= config.frames
    if isinstance(config, kv.Sinks):
        assert held[-1][:config.sink_frames] == list(range(config.sink_frames))


def test_full_kv_grows_and_positions_never_run_out(pipe):
    s = stream(pipe, PROMPT, frames=20 * SPEC.chunk_frames, steps=1, guidance=1.0)  # 80 frames, rope table of 64
    out = chunks(s)
    assert out.shape[0] == 80 and np.isfinite(out).all()


def test_a_prompt_switch_keeps_or_flushes_the_old_prompts_frames(pipe):
    kept = stream(pipe, PROMPT, frames=12, steps=2)
    next(kept)
    switched = kept.send(OTHER)
    assert len(kept.cache.held) == 8
    kept.close()
    flushed = stream(pipe, PROMPT, frames=12, steps=2, on_prompt_switch="flush")
    next(flushed)
    fresh_start = flushed.send(OTHER)
    assert len(flushed.cache.held) == 4
    flushed.close()
    assert not np.array_equal(switched, fresh_start)
    recached = stream(pipe, PROMPT, frames=12, steps=2, on_prompt_switch="recache", kv=kv.SlidingWindow(frames=8))
    next(recached)
    next(recached)
    after = recached.send(OTHER)
    assert recached.cache.held == [4, 5, 6, 7, 8, 9, 10, 11] and sorted(recached.clean) == recached.cache.held
    recached.close()
    assert not np.array_equal(after, switched)


@pytest.mark.parametrize("kwargs, error", [
    ({"kv": kv.SlidingWindow(frames=2)}, "cannot hold one chunk of 4"),
    ({"kv": kv.Sinks(frames=6, sink_frames=3)}, "fewer than one chunk of 4"),
    ({"frames": 10}, "multiple of the chunk size 4"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"kv": kv.FullKV(commit="never")}, "commit must be one of"),
    ({"on_prompt_switch": "forget"}, "on_prompt_switch must be one of"),
    ({"on_prompt_switch": "recache", "kv": kv.SlidingWindow(frames=6)}, "multiple of 4 frames"),
])
def test_bad_settings_are_refused_before_any_compute(pipe, kwargs, error):
    with pytest.raises(ValueError, match=error):
        stream(pipe, PROMPT, **kwargs)


def test_a_stream_on_a_context_parallel_transformer_is_refused():
    from diffusers import ContextParallelConfig, ParallelConfig

    split = tiny_pipe()  # what enable_parallelism records on a model (which needs ranks to run)
    split.transformer._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    with pytest.raises(NotImplementedError, match="takes no part in diffusers' context parallelism"):
        stream(split, PROMPT, frames=4)


def test_bad_prompts_are_refused_before_any_compute_also_mid_stream(pipe):
    with pytest.raises(ValueError, match="nothing can grow"):
        stream(pipe, "a red circle grows on a black background")
    s = stream(pipe, PROMPT, frames=12, steps=1)
    first = next(s)
    with pytest.raises(ValueError, match="unknown"):
        s.send("a red dragon moves right on a black background")
    assert s.made == 4 and len(s.cache.held) == 4  # nothing changed
    s.close()
    assert first.shape == (4, 32, 32, 3)


def test_one_stream_at_a_time_on_a_transformer(pipe):
    s = stream(pipe, PROMPT, frames=8, steps=1)
    next(s)
    with pytest.raises(RuntimeError, match="already running"):
        stream(pipe, PROMPT)
    s.close()
    stream(pipe, PROMPT).close()


def test_stream_is_a_public_verb():
    assert tempocache.stream is stream and tempocache.kv.SlidingWindow is kv.SlidingWindow


def test_the_stream_command_writes_an_mp4_that_plays_even_when_interrupted(pipe, tmp_path, monkeypatch):
    import imageio_ffmpeg

    from tempocache import cli, generation
    from tempocache.streaming import Stream

    monkeypatch.setattr(generation, "load_pipeline", lambda model, device: pipe)
    whole = tmp_path / "whole.mp4"
    assert cli.main(["stream", PROMPT, "--frames", "12", "--steps", "1", "--kv", "window:8", "-o", str(whole)]) == 0
    assert imageio_ffmpeg.count_frames_and_secs(str(whole))[0] == 12
    made = Stream._chunk

    def interrupt_after_two(self):
        if self.made == 8:
            raise KeyboardInterrupt
        return made(self)

    monkeypatch.setattr(Stream, "_chunk", interrupt_after_two)
    cut = tmp_path / "cut.mp4"
    assert cli.main(["stream", PROMPT, "--steps", "1", "-o", str(cut)]) == 0
    assert imageio_ffmpeg.count_frames_and_secs(str(cut))[0] == 8
    assert not hasattr(pipe.transformer, "_tempocache_stream")
    assert cli.main(["stream", PROMPT, "--frames", "12", "-o", str(tmp_path / "x.gif")]) == 2  # refused before compute


def test_the_pipeline_call_of_a_streaming_model_is_its_full_kv_stream(pipe):
    clips = pipe([PROMPT, OTHER], num_inference_steps=2, num_frames=8, seed=3).frames
    assert np.array_equal(clips[1], chunks(stream(pipe, OTHER, frames=8, steps=2, seed=4)))
    with pytest.raises(ValueError, match="multiple of 4"):
        pipe(PROMPT, num_frames=6)


def test_the_step_cache_composes_with_streaming(pipe):
    plain = chunks(stream(pipe, PROMPT, frames=8, steps=4, kv=kv.SlidingWindow(frames=4)))
    with tempocache.enabled(pipe, tempocache.StaticCache(interval=1)):  # computes every step: changes nothing
        assert np.array_equal(chunks(stream(pipe, PROMPT, frames=8, steps=4, kv=kv.SlidingWindow(frames=4))), plain)
    for commit in ("reencode", "last_step"):
        with tempocache.enabled(pipe, tempocache.StaticCache(interval=2)) as engine:
            cached = chunks(stream(pipe, PROMPT, frames=8, steps=4, kv=kv.SlidingWindow(frames=4, commit=commit)))
            # each chunk's denoising is one generation, and so is each re-encoding pass (a single, computed call)
            assert engine.counts.generations == (4 if commit == "reencode" else 2)
            assert engine.counts.blocks_reused == 2 * len(pipe.transformer.blocks)  # step 2 of each chunk's 4
        assert np.isfinite(cached).all() and not np.array_equal(cached, plain)


def test_fp8_attention_reads_the_cache_in_self_attention_only():
    exact, fp8 = tiny_pipe(head_dim=32), tiny_pipe(head_dim=32)  # FP8 attention takes head dims in 16s
    state = tempocache.quantize(fp8.transformer, tempocache.W8A8("fp8", attention=True))
    tempocache.quantize(exact.transformer, tempocache.W8A8("fp8"))
    frames, window = 4 * SPEC.chunk_frames, kv.SlidingWindow(frames=8)
    reference, streamed = (chunks(stream(p, PROMPT, frames=frames, steps=2, kv=window)) for p in (exact, fp8))
    calls = 4 * 3 * 2 * len(fp8.transformer.blocks)  # chunks x (2 steps + re-encoding) x (attn1, attn2) per block
    stats = state.stats()
    assert stats["attention_fp8_calls"] == calls // 2  # every self-attention, over the cache's keys and the chunk's
    assert stats["attention_exact_calls"] == {"not self-attention": calls // 2}  # the text cross-attention
    error = np.abs(streamed - reference).mean() / np.abs(reference).mean()
    assert 0 < error < 0.01  # e4m3 rounding, not a wrong result


def test_prompts_streamed_side_by_side_match_their_streams_alone(pipe):
    together = chunks(stream(pipe, [PROMPT, OTHER], frames=8, steps=2, seed=7))  # (prompts x frames) chunk by chunk
    assert together.shape == (2 * 2, 4, 32, 32, 3)
    alone = chunks(stream(pipe, OTHER, frames=8, steps=2, seed=8))
    np.testing.assert_allclose(np.concatenate([together[1], together[3]]), alone, atol=1e-5)
    s = stream(pipe, [PROMPT, OTHER], frames=8, steps=1)
    with pytest.raises(ValueError, match="2 videos side by side"):
        s.send(PROMPT)
    s.close()


def test_the_drift_curve_is_measured_every_n_frames(pipe):
    from tempocache.eval.stream_quality import evaluate_stream

    result = evaluate_stream(pipe, {"window": kv.SlidingWindow(frames=8)}, captions=2, frames=24, every=8, steps=1)
    assert result["starts"] == [0, 8, 16]
    for name in ("full KV", "window"):
        assert len(result["policies"][name]["accuracy"]) == 3 and 0 <= result["policies"][name]["accuracy"][0]["all"] <= 1
    assert result["policies"]["window"]["psnr_vs_full_kv"][0] == 100.0  # the window holds all of the first 8 frames


def test_deep_sink_holds_half_of_its_window_for_good(pipe):
    config = kv.DeepSink(frames=16)
    assert config.sink_frames == 8
    s = stream(pipe, PROMPT, steps=1, guidance=1.0, kv=config)
    for _ in range(10):
        next(s)
    assert s.cache.held == [*range(8), *range(32, 40)]
    s.close()
    with pytest.raises(ValueError, match="sink_share must be between 0 and 1"):
        stream(pipe, PROMPT, kv=kv.DeepSink(frames=16, sink_share=1.5))
    with pytest.raises(ValueError, match="fewer than one chunk"):
        stream(pipe, PROMPT, kv=kv.DeepSink(frames=6))


def test_blockwise_attention_equals_attention_over_the_whole():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, 3, 8, generator=g) for _ in range(3))
    k, v = torch.cat([k, torch.randn(2, 13, 3, 8, generator=g)], 1), torch.cat([v, torch.randn(2, 13, 3, 8, generator=g)], 1)
    bias = torch.rand(2, 23, generator=g).log1p() * (torch.arange(23) < 15)  # logit corrections on the first blocks
    whole = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                             attn_mask=bias[:, None, None])
    blocks = [(k[:, i:i + 5], v[:, i:i + 5], bias[:, i:i + 5] if i < 15 else None) for i in range(0, 23, 5)]
    torch.testing.assert_close(kv.blockwise_attention(q, blocks), whole.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_a_quantized_cache_keeps_its_newest_frames_exact_and_the_rest_close(pipe):
    window = kv.SlidingWindow(frames=12)
    exact = chunks(stream(pipe, PROMPT, frames=24, steps=2, kv=window))
    all_recent = kv.SlidingWindow(frames=12, quant=kv.KVQuant(bits=4, recent_frames=12))  # nothing ever quantized
    assert np.array_equal(chunks(stream(pipe, PROMPT, frames=24, steps=2, kv=all_recent)), exact)
    sizes = {}
    for bits, least_psnr in ((8, 35.0), (4, 20.0)):
        config = kv.SlidingWindow(frames=12, quant=kv.KVQuant(bits=bits, recent_frames=4, group_frames=2))
        s = stream(pipe, PROMPT, frames=24, steps=2, kv=config)
        out = chunks(s)
        sizes[bits] = s.stats()["peak_kv_bytes"]
        assert len(s.cache.compact) == 8 and len(s.cache.slot_of) == 4
        mse = float(((out - exact) ** 2).mean())
        assert 0 < mse and 10 * np.log10(1 / mse) > least_psnr
        # by default each layer rebuilds its quantized frames at once for the fused attention: the same result
        fused = chunks(stream(pipe, PROMPT, frames=24, steps=2, kv=kv.SlidingWindow(frames=12, quant=kv.KVQuant(bits=bits))))
        np.testing.assert_allclose(fused, out, atol=1e-4)
        # rebuilt once a chunk and held for its steps: the very same numbers
        once = kv.SlidingWindow(frames=12, quant=kv.KVQuant(bits=bits, group_frames="chunk"))
        assert np.array_equal(chunks(stream(pipe, PROMPT, frames=24, steps=2, kv=once)), fused)
    full_bytes = stream(pipe, PROMPT, frames=24, steps=2, kv=window)
    list(full_bytes)
    assert sizes[4] < sizes[8] < full_bytes.stats()["peak_kv_bytes"]


def test_bad_quantization_settings_are_refused(pipe):
    with pytest.raises(ValueError, match="not a multiple of 2 here"):
        kv.KVQuant(bits=4).check(25)
    for quant, error in ((kv.KVQuant(bits=3), "bits must be one of"), (kv.KVQuant(group_frames=0), "group_frames"),
                         (kv.KVQuant(group_frames="layer"), "None or 'chunk'")):
        with pytest.raises(ValueError, match=error):
            stream(pipe, PROMPT, kv=kv.SlidingWindow(frames=8, quant=quant))
    with pytest.raises(TypeError, match="quant must be a kv.KVQuant"):
        stream(pipe, PROMPT, kv=kv.SlidingWindow(frames=8, quant=8))


def test_recomputing_the_history_equals_a_window_until_a_frame_leaves_it(pipe):
    window = chunks(stream(pipe, PROMPT, frames=16, steps=2, kv=kv.SlidingWindow(frames=8)))
    s = stream(pipe, PROMPT, frames=16, steps=2, kv=kv.Recompute(frames=8))
    recomputed = chunks(s)
    np.testing.assert_allclose(recomputed[:12], window[:12], atol=2e-5)  # the third chunk still sees every frame
    assert not np.allclose(recomputed[12:], window[12:], atol=2e-5)  # the cached frames carry the first chunk's context
    assert s.stats()["kv_bytes"] == 0 and s.history.shape[2] == 8
    with pytest.raises(ValueError, match="multiple of the chunk size 4"):
        stream(pipe, PROMPT, kv=kv.Recompute(frames=6))


def test_the_stream_bench_writes_its_report(pipe, tmp_path):
    from tempocache.cli import method_range
    from tempocache.eval.stream_bench import run_stream_bench

    result = run_stream_bench(pipe, tmp_path, context=12, budgets=(8, 10), captions=2, frames=16, every=8, steps=2,
                              timing_chunks=2)
    policies = result["policies"]
    assert len(policies) == 27 and policies["full KV"]["kv_bytes"][16] > 0
    assert policies["recompute history (12 frames)"]["kv_bytes"][16] == 0
    for budget in (8, 10):  # every bounded method within its budget's memory
        names = [n for n in policies if f"({budget})" in n or f"{budget} frames' memory" in n or f"+ {budget - 3})" in n]
        assert len(names) == 11
        window = policies[f"Self-Forcing window ({budget})"]["kv_bytes"][16]
        assert all(policies[n]["kv_bytes"][16] <= window for n in names), names
    assert any(n.startswith("tempocache window (12), int4, 8 frames'") for n in policies)  # more frames in 4 bits
    assert policies["Self-Forcing window (12) + step cache Auto(0.5)"]["step_cache"].startswith("Auto(")
    for name in ("results.json", "samples.npz", "table.md", "memory.png", "accuracy.png", "index.html", "videos/26.mp4"):
        assert (tmp_path / name).is_file(), name
    assert "| Self-Forcing window (8) |" in (tmp_path / "table.md").read_text()
    picked = run_stream_bench(pipe, tmp_path / "picked", context=12, budgets=(8, 10), captions=2, frames=8, every=8,
                              steps=2, timing_chunks=1, methods=method_range("3,1"), full_kv=False, videos=False)
    assert list(picked["policies"]) == ["tempocache Auto (8 frames' memory)", "Self-Forcing window (8)"]
    assert all("psnr_vs_full_kv" not in row for row in picked["policies"].values())
    with pytest.raises(argparse.ArgumentTypeError, match="0:4,7"):
        method_range("1-3")


def test_participative_eviction_keeps_the_frames_attended_to(pipe):
    config = kv.Participative(frames=8, recent_frames=4)
    assert config.evict([0, 1, 2, 3, 4, 5, 6, 7], 4, {0: 0.5, 1: 0.1, 2: 0.9, 3: 0.2, 4: 0.0, 5: 0.8, 6: 0.3, 7: 0.7}) \
        == [1, 3, 4, 6]  # the four least attended; the chunk itself is the newest four
    frames = 3 * SPEC.chunk_frames
    full = chunks(stream(pipe, PROMPT, frames=frames, steps=2))
    assert np.array_equal(chunks(stream(pipe, PROMPT, frames=frames, steps=2, kv=kv.Participative(frames=12))), full)
    s = stream(pipe, PROMPT, steps=1, guidance=1.0, kv=kv.Participative(frames=8, recent_frames=2))
    sizes = []
    for _ in range(30):
        next(s)
        sizes.append(s.stats()["kv_bytes"])
        assert s.cache.held[-2:] == [s.made - 2, s.made - 1] and set(s.cache.attention) <= set(s.cache.held)
    s.close()
    assert len(set(sizes[2:])) == 1
    for bad, error in (({"recent_frames": 9}, "cannot exceed"), ({"decay": 2}, "decay must be")):
        with pytest.raises(ValueError, match=error):
            stream(pipe, PROMPT, kv=kv.Participative(frames=8, **bad))


def test_quantized_bytes_are_what_a_quantized_frame_holds():
    key, value = torch.randn(2, 2, 16, 3, 24).unbind(0)
    for bits in (8, 4):
        assert quantized_bytes(2, 16, 3, 24, bits) == quantize_frame(key, value, bits).nbytes()


def _bits(cache: kv.KVCache) -> dict[tuple[int, int], int]:
    """(frame, layer) -> the bits it is held in there: 16 exact, 8 or 4, 1 a summary."""
    bits = {(f, i): 16 for f in cache.slot_of for i in range(len(cache.layers))}
    return bits | {(f, i): getattr(q, "bits", 1) for i, layer in enumerate(cache.layers) for f, q in layer.compact.items()}


def test_auto_fits_its_memory_budget_choosing_bits_by_layer_and_frame(pipe):
    window = stream(pipe, [PROMPT, OTHER], steps=1, kv=kv.SlidingWindow(frames=8))
    for _ in range(12):
        next(window)
    budget = window.stats()["kv_bytes"]  # what a window of 8 exact frames holds
    window.close()
    for config in (kv.Auto(frames=24, memory=budget), kv.Auto(frames=24, memory_frames=8),
                   kv.Auto(frames=24, memory=budget, exact_frames=6, summaries=True)):  # too little for all in 4 bits
        s = stream(pipe, [PROMPT, OTHER], steps=1, kv=config)
        before, mixed = {}, False
        for _ in range(60):
            next(s)
            assert budget * 0.8 < s.stats()["kv_bytes"] <= budget or s.made < 24  # it spends the budget, no more
            now = _bits(s.cache)
            assert all(now[k] <= before[k] for k in now if k in before)  # precision only falls as a frame ages
            layers_of = {f: {b for (g, _), b in now.items() if g == f} for f, _ in now}
            mixed |= any(len(b) > 1 or len([k for k in now if k[0] == f]) < len(s.cache.layers)
                         for f, b in layers_of.items())
            before = now
        assert len(s.cache.held) > 8 and s.cache.held[-1] == s.made - 1  # more frames than the window holds
        assert mixed  # some frame held in different bits, or dropped, layer by layer
        if config.summaries:  # nothing within the context dropped: what is not quantized is summarized
            assert len(now) == len(s.cache.held) * len(s.cache.layers) and 1 in now.values()
        s.close()


def test_auto_needs_a_budget_it_can_meet(pipe):
    for config, error in ((kv.Auto(), "one budget"), (kv.Auto(memory=10**9, memory_frames=8), "one budget"),
                          (kv.Auto(memory_frames=2), "less than the 4 frames kept exact"),
                          (kv.Auto(memory=1000), "bytes is less than the KV"),
                          (kv.Auto(memory_frames=8, exact_frames=30), "cannot exceed"),
                          (kv.Auto(memory_frames=8, quant=kv.KVQuant()), "leave quant None"),
                          (kv.Auto(frames=2, memory_frames=8), "cannot hold one chunk"),
                          (kv.Auto(memory_frames=8, rebuild_frames="all"), "None, 'chunk' or an integer")):
        with pytest.raises(ValueError, match=error):
            stream(pipe, PROMPT, kv=config)


def test_auto_rebuilding_once_a_chunk_changes_nothing(pipe):
    for summaries in (False, True):
        every_call, once = (kv.Auto(frames=24, memory_frames=8, exact_frames=4, summaries=summaries, rebuild_frames=r)
                            for r in (None, "chunk"))
        assert np.array_equal(chunks(stream(pipe, PROMPT, frames=32, steps=2, kv=once)),
                              chunks(stream(pipe, PROMPT, frames=32, steps=2, kv=every_call)))


def _attend_chunks(config: kv.KVConfig, rope, chunks_kv, query) -> list[torch.Tensor]:
    """The chunk outputs of one layer's cache, fed each chunk's (key, value) in turn and committing each."""
    cache = kv.KVCache(config, 1, rope, kv.Layout(SPEC.chunk_frames, 8, 8))
    outs = []
    for key, value in chunks_kv:
        outs.append(cache.attend(0, query, key, value, _sdpa))
        cache.commit()
    return outs


def _sdpa(q, k, v, bias):
    mask = None if bias is None else bias[:, None, None].to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)


def test_heavy_hitters_keep_each_layers_most_attended_tokens(pipe):
    g = torch.Generator().manual_seed(2)
    config = kv.HeavyHitters(frames=12, recent_frames=4, keep=0.25)
    cache = kv.KVCache(config, 2, pipe.transformer.rope, kv.Layout(SPEC.chunk_frames, 8, 8))
    query = torch.randn(2, SPEC.chunk_frames * 64, 2, 24, generator=g)
    for _ in range(5):
        key, value = (torch.randn(2, SPEC.chunk_frames * 64, 2, 24, generator=g) for _ in range(2))
        for layer in range(2):
            cache.attend(layer, query, key * (1 + layer), value, _sdpa)  # the layers attend differently
        leaving = {f: [m.clone() for m in cache.token_attention[f]] for f in cache.slot_of}  # all but the chunk
        cache.commit()
        for frame, masses in leaving.items():
            for layer, mass in enumerate(masses):
                held = cache.layers[layer].compact[frame]
                assert len(held) == 16 and set(held.place[0].tolist()) == set(mass.topk(16).indices.tolist())
    places = [cache.layers[layer].compact[cache.compact[0]].place[0].tolist() for layer in range(2)]
    assert places[0] != places[1]  # each layer its own tokens
    assert len(cache.held) == 12 and len(cache.compact) == 8 and not cache.token_attention.keys() - set(cache.slot_of)


def test_temporal_merging_is_exact_for_exact_duplicates(pipe):
    g = torch.Generator().manual_seed(0)
    rope, t_dim, shape = pipe.transformer.rope, pipe.transformer.rope.t_dim, (2, 64, 2, 24)  # (B, places, heads, D)
    background_key, background_value = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    background_key[..., :t_dim] = 0  # keys without a temporal part: equal after rotation at any frame's position
    frames_kv = []
    for _ in range(7 * SPEC.chunk_frames):  # a static background and 8 places that change every frame
        key, value = background_key.clone(), background_value.clone()
        key[:, 20:28], value[:, 20:28] = torch.randn(2, 8, 2, 24, generator=g), torch.randn(2, 8, 2, 24, generator=g)
        frames_kv.append((key, value))
    chunks_kv = [tuple(torch.cat(part, 1) for part in zip(*frames_kv[i:i + SPEC.chunk_frames]))
                 for i in range(0, len(frames_kv), SPEC.chunk_frames)]
    query = torch.randn(2, SPEC.chunk_frames * 64, 2, 24, generator=g)
    window = _attend_chunks(kv.SlidingWindow(frames=12), rope, chunks_kv, query)
    merged = _attend_chunks(kv.TempCache(frames=12, recent_frames=4, keep=0.125), rope, chunks_kv, query)
    for a, b in zip(window, merged):  # the window slides past merged frames: their counts follow it
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    unmerged = _attend_chunks(kv.TempCache(frames=12, recent_frames=4, keep=0.125), rope,
                              [(k + 0.5 * torch.randn(k.shape, generator=g), v) for k, v in chunks_kv], query)
    assert not torch.allclose(unmerged[-1], window[-1], atol=1e-3)  # the same test can fail


def test_a_summary_is_exact_for_a_frame_of_one_token_repeated(pipe):
    g = torch.Generator().manual_seed(1)
    rope = pipe.transformer.rope
    cos, sin = kv.cache.FramePositions(rope, 8, 8)([0], torch.device("cpu"))  # each place's rotation in a frame
    frames_kv = []
    for _ in range(6 * SPEC.chunk_frames):  # each frame one key (rotated back from its places) and one value
        key = kv.rope.rotate(torch.randn(2, 1, 2, 24, generator=g).expand(2, 64, 2, 24), cos, -sin)
        frames_kv.append((key, torch.randn(2, 1, 2, 24, generator=g).expand(2, 64, 2, 24)))
    chunks_kv = [tuple(torch.cat(part, 1) for part in zip(*frames_kv[i:i + SPEC.chunk_frames]))
                 for i in range(0, len(frames_kv), SPEC.chunk_frames)]
    query = torch.randn(2, SPEC.chunk_frames * 64, 2, 24, generator=g)
    window = _attend_chunks(kv.SlidingWindow(frames=12), rope, chunks_kv, query)
    pruned = _attend_chunks(kv.SoftPrune(frames=12, recent_frames=4, kept_frames=0), rope, chunks_kv, query)
    for a, b in zip(window, pruned):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_merging_and_soft_pruning_change_nothing_until_a_frame_leaves_the_exact_ones(pipe):
    window = chunks(stream(pipe, PROMPT, frames=24, steps=2, kv=kv.SlidingWindow(frames=12)))
    for config in (kv.TempCache(frames=12, recent_frames=12), kv.SoftPrune(frames=12, recent_frames=12, kept_frames=0),
                   kv.HeavyHitters(frames=12, recent_frames=12)):
        assert np.array_equal(chunks(stream(pipe, PROMPT, frames=24, steps=2, kv=config)), window)
    # every token kept: merged frames read with a logit correction of zero
    for config in (kv.TempCache(frames=12, keep=1.0), kv.HeavyHitters(frames=12, keep=1.0)):
        np.testing.assert_allclose(chunks(stream(pipe, PROMPT, frames=24, steps=2, kv=config)), window, atol=1e-4)


def test_merging_and_soft_pruning_hold_less_than_their_window(pipe):
    sizes = {}
    for name, config in (("window", kv.SlidingWindow(frames=12)), ("merged", kv.TempCache(frames=12, keep=0.25)),
                         ("pruned", kv.SoftPrune(frames=12, kept_frames=4)), ("small", kv.SlidingWindow(frames=4)),
                         ("hitters", kv.HeavyHitters(frames=12, keep=0.25))):
        s = stream(pipe, PROMPT, frames=32, steps=1, kv=config)
        out = chunks(s)
        sizes[name] = s.stats()["peak_kv_bytes"]
        assert np.isfinite(out).all()
    assert sizes["small"] < sizes["pruned"] < sizes["window"] and sizes["small"] < sizes["merged"] < sizes["window"]
    assert sizes["small"] < sizes["hitters"] < sizes["window"]


def test_the_kv_forms_of_the_command_line():
    from tempocache.cli import kv_policy

    assert kv_policy("heavy-hitters:12,last-step") == kv.HeavyHitters(frames=12, commit="last_step")
    assert kv_policy("tempcache:28") == kv.TempCache(frames=28)
    assert kv_policy("auto:8,int4") == kv.Auto(memory_frames=8, quant=kv.KVQuant(bits=4))  # refused when streamed
    with pytest.raises(argparse.ArgumentTypeError, match="heavy-hitters:N"):
        kv_policy("hitters:12")


def test_bad_merging_and_soft_pruning_settings_are_refused(pipe):
    for config, error in ((kv.TempCache(keep=0), "keep must be"), (kv.TempCache(keep=1.5), "keep must be"),
                          (kv.TempCache(frames=8, recent_frames=9), "cannot exceed"),
                          (kv.TempCache(quant=kv.KVQuant()), "leave quant None"),
                          (kv.SoftPrune(frames=8, recent_frames=4, kept_frames=5), "cannot exceed"),
                          (kv.SoftPrune(bits=3), "bits must be one of"),
                          (kv.SoftPrune(novelty=-1), "novelty must be"),
                          (kv.HeavyHitters(keep=0), "keep must be"), (kv.HeavyHitters(decay=2), "decay must be"),
                          (kv.HeavyHitters(quant=kv.KVQuant()), "leave quant None")):
        with pytest.raises(ValueError, match=error):
            stream(pipe, PROMPT, kv=config)


def test_a_stream_runs_on_compiled_blocks_with_its_cache_left_eager():
    from torch._dynamo.utils import counters

    eager = chunks(stream(tiny_pipe(), PROMPT, frames=4 * SPEC.chunk_frames, kv=kv.SlidingWindow(frames=8), steps=2))
    compiled = tiny_pipe()
    compiled.transformer.compile_repeated_blocks(backend="eager")  # dynamo's tracing, no code generation
    torch._dynamo.reset()
    counters.clear()
    try:
        out = chunks(stream(compiled, PROMPT, frames=4 * SPEC.chunk_frames, kv=kv.SlidingWindow(frames=8), steps=2))
        graphs, recompiles = counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())
    finally:
        torch._dynamo.reset()
    assert np.array_equal(out, eager)
    assert graphs == 2 and recompiles == 0  # each block: before and after its self-attention, for every chunk
