"""ShapesStream: the event log is what the frames show, every question's answer follows from the log, the split holds
and the answers are balanced."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from tempocache.reference import shapes_stream as ss
from tempocache.reference.shapesworld import BACKGROUNDS, COLOURS


def test_a_stream_is_seeded_and_its_log_is_what_its_frames_hold():
    stream = ss.ShapesStream(3, 4096)
    again = ss.ShapesStream(3, 4096)
    assert stream.events == again.events and torch.equal(stream.render(100, 140), again.render(100, 140))
    assert stream.events != ss.ShapesStream(4, 4096).events
    assert set(e.kind for e in stream.events) == set(ss.KINDS)
    states = stream.states
    for e in stream.events:
        before, after = states[e.frame - 1], states[e.frame]
        shapes_before = {s: c for s, c, *_ in before["objects"]}
        shapes_after = {s: c for s, c, *_ in after["objects"]}
        if e.kind == "enter":
            assert e.shape not in shapes_before and e.shape in shapes_after
        elif e.kind == "leave":
            assert e.shape in shapes_before and e.shape not in shapes_after
        elif e.kind == "recolour":
            assert (shapes_before[e.shape], shapes_after[e.shape]) == (e.before, e.after)
        elif e.kind == "background":
            assert (before["background"], after["background"]) == (e.before, e.after)
    for frame in (0, 1000, 4095):  # the commonest pixel is the background's colour
        pixels = (stream.render(frame, frame + 1)[0] * 255).round().flatten(1).T
        colour, _ = collections.Counter(map(tuple, pixels.int().tolist())).most_common(1)[0]
        assert colour == BACKGROUNDS[states[frame]["background"]]
        for shape, name, *_ in states[frame]["objects"]:  # every object in view can be told from the background
            assert COLOURS[name] != BACKGROUNDS[states[frame]["background"]]


def test_objects_never_hide_one_another():
    for seed in range(3):
        for state in ss.ShapesStream(seed, 2048).states:
            placed = state["objects"]
            assert all(np.hypot(a[2] - b[2], a[3] - b[3]) >= 2 * ss.RADIUS for i, a in enumerate(placed)
                       for b in placed[i + 1:])


def test_every_answer_follows_from_the_log_and_the_buckets_and_answers_are_covered():
    stream = ss.ShapesStream(5, 4096)
    questions = stream.questions(120)
    assert len(questions) == 120 and len(set(questions)) == 120
    assert {q.bucket() for q in questions} == set(ss.BUCKETS)
    vocabulary = set(ss.vocabulary())
    for q in questions:
        assert q.answer in ss.answers(q.kind) and set(q.text.split()) <= vocabulary and q.answer in vocabulary
        assert 0 <= q.evidence < q.asked <= stream.frames
        seen = [e for e in stream.events if e.frame < q.asked]
        if q.kind == "entered_first":
            assert q.answer == next(e.shape for e in seen if e.kind == "enter")
        elif q.kind == "count_left":
            assert ss.COUNTS.index(q.answer) + 1 == sum(e.kind == "leave" for e in seen)
        elif q.kind == "background_when":
            assert q.answer == stream.states[q.evidence]["background"]
        else:
            before = {s: c for s, c, *_ in stream.states[q.evidence - 1]["objects"]}
            assert before[q.shape] == q.answer and q.text.endswith(
                next(e.after for e in seen if e.kind == "recolour" and e.frame == q.evidence))


def test_balance_gives_every_answer_of_a_type_equally_often():
    questions = [q for seed in range(12) for q in ss.ShapesStream(seed, 1024).questions(24)]
    kept = [questions[i] for i in ss.balance(questions)]
    present = 0
    for kind in ss.QUESTION_TYPES:
        counts = collections.Counter(q.answer for q in kept if q.kind == kind)
        assert not counts or set(counts) == set(ss.answers(kind)) and len(set(counts.values())) == 1
        present += bool(counts)
    assert present >= 3
    assert ss.balance(questions) == sorted(set(ss.balance(questions)))


def test_training_streams_never_show_a_held_out_combination_and_held_out_ones_do():
    for seed in range(6):
        shown = {(s, c) for state in ss.ShapesStream(seed, 1024).states for s, c, *_ in state["objects"]}
        assert not any(ss.is_held_out(*c) for c in shown)
        held = ss.ShapesStream(seed, 1024, split="held_out")
        assert held.held_out_shapes
        assert all(q.shape is None or q.shape in held.held_out_shapes for q in held.questions(12))
    assert any(ss.is_held_out(s, c) for s in ss.SHAPES for c in COLOURS)


@pytest.mark.parametrize("call, message", [
    (lambda: ss.ShapesStream(0, 0), "at least one frame"),
    (lambda: ss.ShapesStream(0, 128, split="test"), "accepted: train, held_out"),
    (lambda: ss.ShapesStream(0, 128).render(100, 200), "not in a stream of 128"),
    (lambda: ss.ShapesStream(0, 128).candidates(0), "after 1 to 128 frames"),
])
def test_bad_requests_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
