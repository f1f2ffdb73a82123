"""ShapesWorld edits: one change per triplet, its mask the pixels that differ, a held-out split over combinations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tempocache.reference.edits import (KINDS, check_instruction, held_out_edits, render_edit,
                                        sample_edit, vocabulary)
from tempocache.reference.shapesworld import parse_caption


def edits(split: str, per_kind: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [sample_edit(rng, split, kind) for kind in KINDS for _ in range(per_kind)]


def test_the_same_seed_gives_the_same_edit():
    a, b = (sample_edit(np.random.default_rng(3)) for _ in range(2))
    assert a.instruction == b.instruction and np.array_equal(a.source_layout, b.source_layout)
    assert all(torch.equal(x, y) for x, y in zip(render_edit(a), render_edit(b)))


@pytest.mark.parametrize("split", ["train", "held_out"])
def test_each_edit_makes_exactly_the_change_it_names(split):
    for edit in edits(split):
        source, target, mask = render_edit(edit)
        check_instruction(edit.instruction)
        assert parse_caption(edit.source.caption(False)) == edit.source  # both scenes are grammatical
        assert parse_caption(edit.target.caption(False)) == edit.target
        assert mask.any()
        before, after = edit.source.objects, edit.target.objects
        words = edit.instruction.split()
        if edit.kind != "background":  # the change stays within the edited object's box, before and after
            boxes = torch.zeros_like(mask)
            for scene, layout, colour in ((edit.source, edit.source_layout, words[2]),
                                          (edit.target, edit.target_layout, words[-1] if edit.kind == "recolour"
                                           else words[2])):
                row = [i for i, o in enumerate(scene.objects) if o.colour == colour]
                for x, y, r in layout[row, :3]:
                    grid = torch.arange(mask.shape[0]) + 0.5
                    boxes |= ((grid[None] - x).abs() <= r + 1) & ((grid[:, None] - y).abs() <= r + 1)
            assert not (mask & ~boxes).any() and boxes.float().mean() < 0.6, edit.instruction
        if edit.kind == "background":
            assert before == after and edit.source.background != edit.target.background == words[-1]
            assert mask.float().mean() > 0.5  # the global edit
        else:
            assert edit.source.background == edit.target.background
            assert mask.float().mean() < 0.5
        if edit.kind == "recolour":
            assert len(before) == len(after) and len(set(before) - set(after)) == 1
            (old,), (new,) = set(before) - set(after), set(after) - set(before)
            assert (old.colour, old.shape, new.colour, new.shape) == (words[2], words[3], words[4], words[3])
        if edit.kind == "remove":
            assert len(before) == 2 and set(after) < set(before)
        if edit.kind == "add":
            assert len(after) == 2 and set(before) < set(after)
            (new,) = set(after) - set(before)
            assert (new.colour, new.shape) == (words[2], words[3])
        if edit.kind == "move":
            assert before == after and not np.array_equal(edit.source_layout, edit.target_layout)


def test_the_split_is_over_edit_combinations_and_balanced_by_kind():
    train, held_out = edits("train"), edits("held_out")
    assert not any(e.is_held_out() for e in train) and all(e.is_held_out() for e in held_out)
    assert not {e.combination() for e in train} & {e.combination() for e in held_out}
    listed = held_out_edits(25)
    assert [e.kind for e in listed] == list(KINDS) * 5
    assert [e.instruction for e in listed] == [e.instruction for e in held_out_edits(25)]


def test_instructions_outside_the_grammar_are_refused_naming_the_problem():
    check_instruction("make the red square blue")
    with pytest.raises(ValueError, match="unknown word.*'purple'"):
        check_instruction("make the red square purple")
    with pytest.raises(ValueError, match="is not an edit"):
        check_instruction("make the red blue square")
    with pytest.raises(ValueError, match="unknown edit kind 'paint'"):
        sample_edit(np.random.default_rng(0), kind="paint")
    with pytest.raises(ValueError, match="unknown split"):
        sample_edit(np.random.default_rng(0), split="test")
    assert {"make", "remove", "add", "move", "left"} <= set(vocabulary())
