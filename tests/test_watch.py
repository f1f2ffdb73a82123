"""tempocache.watch: with full KV a watched stream answers as the trained (packed) model does; a memory as long as the
stream, and ReKV retrieving every block, change nothing; bounded memories stay flat; a question leaves the memory as
it found it; bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch

from tempocache import kv
from tempocache.reference import vqa
from tempocache.reference.shapes_stream import ShapesStream, answers
from tempocache.understanding import Auto, Condensed, ReKV, watch
from tempocache.understanding.auto import _Profile
from tempocache.understanding.rekv import block_scores, retrieve
from test_vqa import tiny

WINDOW = 8


def scores(answer) -> torch.Tensor:
    return torch.tensor(list(answer.scores.values()))


def asked(stream, questions, memory, chunk_frames=3):
    """Each question's answer, the stream read up to where it was asked."""
    model, _ = tiny(WINDOW)
    watcher, out = watch(model, memory, chunk_frames), []
    for q in sorted(questions, key=lambda q: q.asked):
        watcher.add(stream.render(watcher.frames, q.asked))
        out.append(watcher.ask(q.text))
    return out


def test_with_full_kv_a_watched_stream_answers_as_the_trained_model_does(one_thread):
    model, tokenizer = tiny()
    stream = ShapesStream(3, 96)
    questions = sorted(stream.questions(4, window=WINDOW), key=lambda q: q.asked)
    packed = vqa.pack(stream, 96, questions, tokenizer, window=WINDOW)
    with torch.no_grad():
        logits = model(input_ids=packed.input_ids, pixel_values=packed.pixel_values, attention_mask=packed.attention_mask(),
                       position_ids=packed.position_ids).logits[0, packed.answer_at]
    for q, row, answer in zip(questions, logits, asked(stream, questions, kv.FullKV())):
        expected = row[tokenizer.answer_ids()[q.kind]]
        torch.testing.assert_close(scores(answer), expected, atol=1e-4, rtol=1e-4)
        assert answer.word == answers(q.kind)[int(expected.argmax())] and answer.frames == list(range(q.asked))


def test_a_memory_as_long_as_the_stream_and_rekv_retrieving_everything_change_nothing(one_thread):
    stream = ShapesStream(3, 96)
    questions = stream.questions(4, window=WINDOW)
    full = asked(stream, questions, kv.FullKV())
    for same, answer in zip(asked(stream, questions, kv.Sinks(frames=96, sink_frames=2)), full):
        assert torch.equal(scores(same), scores(answer))
    for same, answer in zip(asked(stream, questions, ReKV(frames=12, sink_frames=2, top_k=96)), full):
        torch.testing.assert_close(scores(same), scores(answer), atol=1e-5, rtol=1e-5)
        assert same.frames == answer.frames


def test_bounded_memories_stay_flat_and_rekv_offloads_the_rest(one_thread):
    model, _ = tiny()
    stream = ShapesStream(0, 240)
    for memory in (kv.Sinks(frames=10, sink_frames=2), ReKV(frames=10, sink_frames=2, top_k=3)):
        watcher, device = watch(model, memory), []
        for start in range(0, 240, 40):
            watcher.add(stream.render(start, start + 40))
            device.append(watcher.stats()["device_kv_bytes"])
        stats = watcher.stats()
        assert len(set(device)) == 1 and stats["device_frames"] == 10 and stats["frames"] == 240
        if isinstance(memory, ReKV):
            assert stats["host_frames"] == 230 and stats["host_kv_bytes"] == 23 * device[0]
            answer = watcher.ask("which shape entered first")
            # the sinks and the window, and 3 frames retrieved at each of the 2 layers
            assert 13 <= len(answer.frames) <= 16 and answer.frames[:2] == [0, 1] and answer.frames[-8:] == list(range(232, 240))
        else:
            assert stats["host_frames"] == 0


def test_a_model_over_larger_frames_streams_as_many_tokens_a_frame_as_its_vision_tower_makes(one_thread):
    from test_vqa import TINY_TEXT, TINY_VISION

    torch.manual_seed(0)
    model = vqa.build_model({**TINY_VISION, "image_size": 48}, TINY_TEXT).eval()
    assert model.config.image_seq_length == 36
    watcher = watch(model, ReKV(frames=4, sink_frames=1, top_k=1), chunk_frames=2)
    watcher.add(torch.rand(6, 3, 48, 48))
    stats = watcher.stats()
    assert stats["device_frames"] == 4 and stats["host_frames"] == 2
    assert stats["host_kv_bytes"] == stats["device_kv_bytes"] // 2
    assert watcher.ask("which shape entered first").word in answers("entered_first")


def test_a_question_leaves_the_memory_as_it_found_it(one_thread):
    model, _ = tiny()
    stream = ShapesStream(0, 64)
    quiet, curious = (watch(model, ReKV(frames=10, sink_frames=2, top_k=2)) for _ in range(2))
    for watcher in (quiet, curious):
        watcher.add(stream.render(0, 40))
    before = curious.stats()
    curious.ask("how many objects have left")
    with pytest.raises(ValueError, match="unknown words 'purple'"):
        curious.ask("what colour was the purple square before it turned blue")
    assert curious.stats() == before
    for watcher in (quiet, curious):
        watcher.add(stream.render(40, 64))
    assert torch.equal(scores(quiet.ask("which shape entered first")), scores(curious.ask("which shape entered first")))


def test_rekv_stores_its_host_frames_in_fewer_bits(one_thread):
    stream = ShapesStream(3, 96)
    questions = stream.questions(3, window=WINDOW)
    exact = asked(stream, questions, ReKV(frames=12, sink_frames=2, top_k=96))
    host = {}
    for bits in (8, 4, 2):
        memory = ReKV(frames=12, sink_frames=2, top_k=96, quant=kv.KVQuant(bits=bits))
        answers_ = asked(stream, questions, memory)
        model, _ = tiny(WINDOW)
        watcher = watch(model, memory)
        watcher.add(stream.render(0, 96))
        host[bits] = watcher.stats()["host_kv_bytes"]
        error = max(float((scores(a) - scores(b)).abs().max()) for a, b in zip(answers_, exact))
        assert error < (0.02 if bits == 8 else 0.5), bits
    exact_host = watch(tiny(WINDOW)[0], ReKV(frames=12, sink_frames=2))
    exact_host.add(stream.render(0, 96))
    assert exact_host.stats()["host_kv_bytes"] > host[8] > host[4] > host[2]


def test_two_bit_codes_pack_four_to_a_byte_and_round_to_the_nearest_level():
    from tempocache.kv.quantized import quantize_frame

    x = torch.randn(1, 16, 2, 8)
    frame = quantize_frame(x, x, 2)
    assert frame.key_codes.shape[-1] == 2 and frame.key_codes.dtype == torch.uint8
    assert ((frame.keys(torch.float32) - x).abs() <= frame.key_scale / 2 + 1e-6).all()
    assert ((frame.values(torch.float32) - x).abs() <= frame.value_scale / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="not a multiple of 4 here"):
        kv.KVQuant(bits=2).check(6)


def test_a_condensed_memory_is_exact_uncondensed_and_bounded_when_capped(one_thread):
    stream = ShapesStream(3, 96)
    questions = stream.questions(3, window=WINDOW)
    full = asked(stream, questions, kv.FullKV())
    for same, answer in zip(asked(stream, questions, Condensed(frames=12, sink_frames=2, tokens=16)), full):
        torch.testing.assert_close(scores(same), scores(answer), atol=1e-5, rtol=1e-5)  # tokens=16 condenses nothing
    model, _ = tiny(WINDOW)
    long = ShapesStream(0, 240)
    exact = watch(model, kv.Sinks(frames=10, sink_frames=2))
    exact.add(long.render(0, 40))
    frame = exact.stats()["device_kv_bytes"] // 10  # one exact frame's keys and values, every layer
    for cap in (None, 20):
        watcher, device = watch(model, Condensed(frames=10, sink_frames=2, tokens=1, condensed_frames=cap)), []
        for start in range(0, 240, 40):
            watcher.add(long.render(start, start + 40))
            device.append(watcher.stats()["device_kv_bytes"])
        stats = watcher.stats()
        assert stats["device_frames"] == 10 and stats["condensed_frames"] == (230 if cap is None else 20)
        assert device[-1] == 10 * frame + stats["condensed_frames"] * frame // 16  # a condensed frame: 1 token of 16
        assert cap is None or len(set(device[1:])) == 1
        assert len(watcher.ask("which shape entered first").frames) == 10 + stats["condensed_frames"]


def test_a_condensed_token_with_its_groups_log_size_attends_as_its_alike_tokens_do():
    from tempocache.understanding.condensed import condense

    token = torch.randn(1, 2, 1, 8)
    keys, values = token.expand(1, 2, 16, 8), (token * 2).expand(1, 2, 16, 8)
    other_k, other_v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    query = torch.randn(1, 2, 3, 8)
    pooled_k, pooled_v, bias = condense(keys, values, 1)
    whole = torch.nn.functional.scaled_dot_product_attention(query, torch.cat([other_k, keys], 2),
                                                             torch.cat([other_v, values], 2))
    mask = torch.cat([torch.zeros(5), torch.full((1,), bias)])[None]  # (queries broadcast, keys)
    condensed = torch.nn.functional.scaled_dot_product_attention(query, torch.cat([other_k, pooled_k], 2),
                                                                 torch.cat([other_v, pooled_v], 2), attn_mask=mask)
    torch.testing.assert_close(condensed, whole)
    with pytest.raises(ValueError, match="cannot be condensed to 5"):
        watch(tiny()[0], Condensed(frames=10, sink_frames=2, tokens=5))


SMALL_PROFILE = dict(profile_frames=64, profile_questions=4)


def test_auto_spends_its_budget_in_bytes_on_held_and_retrieved_frames_and_holds_what_it_planned(one_thread):
    model, _ = tiny()
    text = model.config.text_config
    frame = 2 * 16 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4 * text.num_hidden_layers
    plan = Auto(memory=14 * frame + frame // 2, **SMALL_PROFILE).plan(model)
    assert isinstance(plan, ReKV) and plan.frames + plan.top_k == 14 and plan.sink_frames == model.config.stream_sinks
    watcher = watch(model, Auto(memory=14 * frame, **SMALL_PROFILE))
    assert watcher.memory == plan  # the profile is seeded: the same model, the same plan
    watcher.add(ShapesStream(1, 120).render())
    assert watcher.stats()["device_kv_bytes"] == plan.frames * frame
    answer = watcher.ask("which shape entered first")  # each layer: the held frames and its own retrieved ones
    assert [len(r) for r in answer.retrieved] == [plan.top_k] * text.num_hidden_layers


def test_auto_with_room_for_the_whole_stream_answers_as_full_kv_does(one_thread):
    model, _ = tiny()
    stream = ShapesStream(3, 96)
    questions = sorted(stream.questions(4, window=WINDOW), key=lambda q: q.asked)
    memory = Auto(memory_frames=200, **SMALL_PROFILE)
    assert watch(model, memory).memory.frames >= 96
    for got, expected in zip(asked(stream, questions, memory), asked(stream, questions, kv.FullKV())):
        assert got.word == expected.word and got.scores == expected.scores and got.frames == expected.frames


def test_auto_holds_the_recent_frames_where_attention_is_and_retrieves_where_it_is_not():
    recent, old = _Profile(), _Profile()
    mass = torch.zeros(20)
    mass[-6:] = 1 / 6
    recent.questions = [[(mass, torch.arange(20.0))]]
    assert recent.best_hold(12, 2, 6) == 11  # everything is in the last frames: hold the most, retrieve one
    mass = torch.zeros(20)
    mass[[4, 7, 9]] = 0.3
    mass[-1] = 0.1
    scores = torch.zeros(20)
    scores[[4, 7, 9]] = 1.0
    old.questions = [[(mass, scores)]]
    assert old.best_hold(12, 2, 6) == 9  # three old frames carry the mass and score best: room for them, no more
    assert old.recall(9, 3, 2) == pytest.approx(1.0) and old.recall(11, 1, 2) == pytest.approx(0.4)


def test_auto_stores_the_host_frames_in_the_fewest_bits_its_tolerance_allows(one_thread):
    model, _ = tiny()
    assert watch(model, Auto(memory_frames=12, tolerance=0.99, **SMALL_PROFILE)).memory.quant.bits == 2
    assert watch(model, Auto(memory_frames=12, tolerance=1e-6, **SMALL_PROFILE)).memory.quant is None


@pytest.mark.parametrize("memory, message", [
    (Auto(), "one budget"), (Auto(memory=1, memory_frames=2), "one budget"), (Auto(memory=-5), "positive number"),
    (Auto(memory_frames=6), r"below the 2 sink frames, a chunk of 4 and one retrieved frame: give at least \d+ bytes"),
    (Auto(memory_frames=12, quant=kv.KVQuant(bits=4)), "leave quant None"),
    (Auto(memory_frames=12, tolerance=1.5), "tolerance must be in"),
])
def test_auto_refuses_a_budget_it_cannot_plan(memory, message):
    model, _ = tiny()
    with pytest.raises(ValueError, match=message):
        watch(model, memory)


def test_retrieval_scores_blocks_by_the_questions_queries():
    queries = torch.zeros(4, 2, 8)  # 4 query heads onto 2 key-value heads, 2 words
    queries[..., 0] = 1.0
    representatives = torch.zeros(5, 2, 8)
    representatives[3, :, 0], representatives[1, :, 0], representatives[4, :, 0] = 2.0, 1.0, -1.0
    scores = block_scores(queries, representatives)
    assert scores.argmax() == 3 and retrieve(scores, [10, 11, 12, 13, 14], 2) == [11, 13]


@pytest.mark.parametrize("call, error, message", [
    (lambda w: w.ask("which shape entered first"), ValueError, "no frame has been read yet"),
    (lambda w: w.add(torch.rand(4, 3, 16, 16)), ValueError, r"float \(T, 3, 32, 32\)"),
    (lambda w: w.add(torch.ones(4, 3, 32, 32, dtype=torch.uint8)), ValueError, "in \\[0, 1\\]"),
    (lambda w: w.ask("which colour entered first"), ValueError, "not one of the questions"),
])
def test_bad_input_is_refused(call, error, message):
    watcher = watch(tiny()[0])
    with pytest.raises(error, match=message):
        call(watcher)


def test_memories_that_cannot_hold_a_chunk_or_are_for_generation_are_refused():
    model = tiny()[0]
    with pytest.raises(ValueError, match="fewer than one chunk"):
        watch(model, kv.Sinks(frames=4, sink_frames=2), chunk_frames=4)
    with pytest.raises(TypeError, match="not DeepSink"):
        watch(model, kv.DeepSink(frames=8))
    with pytest.raises(ValueError, match="top_k"):
        watch(model, ReKV(frames=8, sink_frames=2, top_k=0))
    with pytest.raises(ValueError, match="takes no quant"):
        watch(model, kv.Sinks(frames=8, sink_frames=2, quant=kv.KVQuant(bits=8)))


def test_the_watch_bench_runs_every_memory_on_the_same_questions(tmp_path, capsys, one_thread):
    from tempocache.cli import main
    from tempocache.reference.train_vqa import evaluate_vqa

    model, _ = tiny(WINDOW)
    model.save_pretrained(tmp_path / "w")
    assert main(["watch-bench", "--weights", str(tmp_path / "w"), "--out", str(tmp_path / "bench"), "--streams", "8",
                 "--frames", "160", "--questions", "8", "--budgets", "12", "--chunk-frames", "4"]) == 0
    result = json.loads((tmp_path / "bench" / "results.json").read_text())
    memories = result["memories"]
    assert {"full KV", "question alone (blind)", "sinks + window (12)", "ReKV (9 + top 3)", "ReKV (9 + random 3)",
            "ReKV (9 + top 3), int2 host"} <= set(memories)
    assert len({row["questions"]["all"] for row in memories.values()}) == 1  # the same questions for all
    # watching with full KV scores what the packed judge scores
    judged = evaluate_vqa(model, streams=8, frames=160, questions=8)
    assert memories["full KV"]["accuracy"]["all"] == pytest.approx(judged["accuracy"]["all"])
    rekv = memories["ReKV (9 + top 3)"]
    assert rekv["device_kv_bytes"] < memories["full KV"]["device_kv_bytes"] and rekv["host_kv_bytes"] > 0
    assert rekv["evidence_recall"] is not None and 0 <= rekv["evidence_recall"] <= 1
    assert memories["question alone (blind)"]["device_kv_bytes_at_question"] >= 0
    auto = memories["Auto (12)"]  # planned once, held to its budget of 12 frames
    assert auto["plan"].startswith("ReKV(") and auto["device_kv_bytes_at_question"] <= \
        memories["sinks + window (12)"]["device_kv_bytes"]
    assert (tmp_path / "bench" / "memory.png").stat().st_size > 0 and "ReKV" in capsys.readouterr().out
