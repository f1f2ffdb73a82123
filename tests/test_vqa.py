"""shapes-vqa's objective: a packed stream with its questions computes what a stream read frame by frame into a KV
cache, then asked, computes; the tokenizer refuses unknown words; the objective can be learned."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from tempocache.reference import vqa
from tempocache.reference import shapes_stream as ss
from tempocache.reference.shapes_stream import ShapesStream

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny(window: int = 8):
    torch.manual_seed(0)
    return vqa.build_model(TINY_VISION, TINY_TEXT, window=window).eval(), vqa.WordTokenizer()


def test_a_packed_stream_computes_what_a_stream_read_into_a_cache_and_then_asked_does():
    model, tokenizer = tiny()
    stream, frames, sinks, window = ShapesStream(3, 96), 96, 2, 8
    questions = stream.questions(4, window=window)
    assert len(questions) >= 2
    packed = vqa.pack(stream, frames, questions, tokenizer, sinks, window)
    with torch.no_grad():
        logits = model(input_ids=packed.input_ids, pixel_values=packed.pixel_values,
                       attention_mask=packed.attention_mask(), position_ids=packed.position_ids).logits[0]
        language, embed = model.model.language_model, model.get_input_embeddings()
        features = torch.cat(model.model.get_image_features(pixel_values=packed.pixel_values).pooler_output)
        mask = vqa.attends(torch.arange(frames), torch.arange(frames), sinks, window)
        cache, read = DynamicCache(config=model.config.text_config), 0
        for q in sorted(questions, key=lambda q: q.asked):
            for start in range(read, q.asked, 5):  # a few frames at a time
                stop = min(start + 5, q.asked)
                rows = slice(start * 16, stop * 16)
                language(inputs_embeds=features[None, rows], attention_mask=mask[None, None, rows, :stop * 16],
                         position_ids=torch.arange(rows.start, rows.stop)[None], cache=cache)
            read = q.asked
            ids = torch.tensor(tokenizer.encode(q.text))
            words = torch.ones(len(ids), q.asked * 16 + len(ids), dtype=torch.bool)
            words[:, q.asked * 16:] = torch.tril(torch.ones(len(ids), len(ids), dtype=torch.bool))
            hidden = language(inputs_embeds=embed(ids)[None], attention_mask=words[None, None], cache=cache,
                              position_ids=(q.asked * 16 + torch.arange(len(ids)))[None]).last_hidden_state
            cache.crop(-len(ids))  # the question leaves the stream's cache as it found it
            streamed = model.lm_head(hidden[0, -1])
            torch.testing.assert_close(streamed, logits[packed.answer_at[questions.index(q)]], atol=1e-4, rtol=1e-4)


def test_the_tokenizer_refuses_unknown_words_and_the_packer_late_questions():
    tokenizer = vqa.WordTokenizer()
    assert tokenizer.encode("which shape entered first?")[-1] == tokenizer.ids[vqa.END]
    with pytest.raises(ValueError, match="unknown words 'purple'"):
        tokenizer.encode("what colour was the purple square before it turned blue")
    with pytest.raises(ValueError, match="empty"):
        tokenizer.encode("?")
    stream = ShapesStream(0, 256)
    late = [q for q in stream.questions(8) if q.asked > 64]
    with pytest.raises(ValueError, match="past the frames packed"):
        vqa.pack(stream, 64, late, tokenizer)


def written_out_mask(packed: vqa.Packed) -> torch.Tensor:
    """The packed sequence's mask block by block: frames under sinks + window, each question over the frames before it
    was asked and causally over its own words."""
    frames = packed.pixel_values.shape[0]
    video, length = frames * 16, packed.input_ids.shape[1]
    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[:video, :video] = vqa.attends(torch.arange(frames), torch.arange(frames), packed.sinks, packed.window)
    start = video
    for q, stop in zip(packed.questions, packed.answer_at.tolist()):
        mask[start:stop + 1, :q.asked * 16] = True
        mask[start:stop + 1, start:stop + 1] = torch.tril(torch.ones(stop + 1 - start, stop + 1 - start, dtype=torch.bool))
        start = stop + 1
    return mask


def test_the_mask_built_from_each_tokens_place_is_the_packed_sequences_and_padding_sees_only_itself():
    from tempocache.reference.train_vqa import collate

    tokenizer = vqa.WordTokenizer()
    short, long = ShapesStream(6, 40), ShapesStream(9, 72)
    packed = [vqa.pack(s, s.frames, s.questions(5, window=8), tokenizer, 2, 8) for s in (short, long)]
    assert all(p.questions for p in packed)
    for p in packed:
        assert torch.equal(p.attention_mask()[0, 0], written_out_mask(p))
    batch = collate(packed)
    mask = vqa.attention_mask(batch["frame_of"], batch["span_of"], batch["sees"], batch["sinks"], batch["window"])[:, 0]
    n = packed[0].input_ids.shape[1]
    assert torch.equal(mask[0, :n, :n], written_out_mask(packed[0])) and not mask[0, :n, n:].any()
    assert torch.equal(mask[0, n:, n:], torch.eye(mask.shape[-1] - n, dtype=torch.bool)) and not mask[0, n:, :n].any()
    assert torch.equal(mask[1], written_out_mask(packed[1]))
    with pytest.raises(ValueError, match=r"one sinks \+ window"):
        collate([packed[0], vqa.pack(long, 72, long.questions(2, window=8), tokenizer, 2, 16)])


def test_the_objective_can_be_learned(one_thread):
    from tempocache.reference.train_vqa import batch_loss, collate

    model, tokenizer = tiny()
    model.train()
    stream = ShapesStream(2, 64)
    packed = vqa.pack(stream, 64, stream.questions(6, window=16), tokenizer, window=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = batch_loss(model, collate([packed]), "cpu")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


def test_the_frame_objective_names_each_shapes_colour_in_view_and_teaches_the_vision_tower(one_thread):
    from tempocache.reference.train_vqa import ABSENT, batch_loss, collate, frame_head, frame_targets

    stream = ShapesStream(3, 96)  # an object enters, then leaves
    targets = frame_targets(stream, 96)
    assert targets.shape == (96, len(ss.SHAPES))
    for state, row in zip(stream.states, targets):
        in_view = {ss.SHAPES.index(s): list(ss.COLOURS).index(c) for s, c, x, y in state["objects"]
                   if 0 <= x < stream.size and 0 <= y < stream.size}
        assert row.tolist() == [in_view.get(i, ABSENT) for i in range(len(ss.SHAPES))]
    assert (targets != ABSENT).any() and (targets == ABSENT).any()

    model, tokenizer = tiny()
    head = frame_head(model)
    batch = collate([vqa.pack(stream, 96, stream.questions(4, window=8), tokenizer, window=8)], [targets])
    answers_only, both = batch_loss(model, batch, "cpu"), batch_loss(model, batch, "cpu", head)
    assert both > answers_only
    both.backward()
    tower = model.model.vision_tower.embeddings.patch_embedding.weight
    assert head.weight.grad.abs().sum() > 0 and tower.grad.abs().sum() > 0


def test_a_batch_of_shorter_streams_holds_as_many_more_of_them_as_fill_its_frames():
    from tempocache.reference.train_vqa import PackedStreams, streams_per_batch

    assert [streams_per_batch(2, (96, 192), n) for n in (192, 96)] == [2, 4]
    short = []
    for batch, _ in zip(PackedStreams(2, (96, 192), 4, seed=0), range(12)):
        streams, frames = batch["frame_of"].shape[0], int(batch["frame_of"].max()) + 1
        assert frames in (96, 192) and streams * frames <= 2 * 192  # a stream with no question to ask is left out
        assert batch["frame_targets"].shape[0] == batch["pixel_values"].shape[0] == streams * frames
        if frames == 96:
            short.append(streams)
    assert short and sum(short) > 2 * len(short)


def test_training_resumes_and_the_judge_scores_by_type_and_bucket(tmp_path, capsys, one_thread):
    from tempocache.cli import main
    from tempocache.reference.train_vqa import train_vqa

    small = dict(frames=(48, 96), questions=4, batch_size=2, workers=0, device="cpu", log_every=1, vision=TINY_VISION,
                 text=TINY_TEXT)
    first = train_vqa(tmp_path / "w", minutes=0.001, **small)
    assert first["steps"] >= 1 and (tmp_path / "w" / "model.safetensors").exists()
    again = train_vqa(tmp_path / "w", minutes=0.001, resume_dir=tmp_path / "w", checkpoint_dir=tmp_path / "ckpt", **small)
    assert again["steps"] > first["steps"] and len(again["sessions"]) == 2 and (tmp_path / "ckpt" / "shapes-vqa.pt").exists()
    logged = again["answer_accuracy"]  # per logged step, the share of the training batches' answers right, by type
    assert [r["step"] for r in logged] == list(range(1, again["steps"] + 1))
    assert all(set(r) - {"step"} <= set(ss.QUESTION_TYPES) and all(0 <= r[k] <= 1 for k in set(r) - {"step"})
               for r in logged)
    assert main(["eval-vqa", "--weights", str(tmp_path / "w"), "--streams", "12", "--frames", "192",
                 "--save", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert {"all", "inside"} <= set(result["accuracy"]) and 0 <= result["accuracy"]["all"] <= 1
    assert sum(result["questions"][k] for k in ss.QUESTION_TYPES if k in result["questions"]) == result["questions"]["all"]
    assert "all" in capsys.readouterr().out

    from tempocache.reference.card import write_vqa_card

    card = write_vqa_card([result], tmp_path / "w").read_text()
    assert f"- steps: {again['steps']}," in card and "| question | inside | beyond | far | all |" in card
    assert "plus the frame objective" in card and "at weight 0.5, 0.5 in its runs" in card
    assert f"{result['streams']} held-out streams of 192 frames (past the longest training stream)" in card
    assert all((tmp_path / "w" / name).stat().st_size > 0 for name in ("loss.png", "answers.png"))
    with pytest.raises(FileNotFoundError, match="train-vqa"):
        vqa.load(tmp_path / "none")
