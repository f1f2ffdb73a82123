"""ShapesWorld edits: one change per triplet, its mask the pixels that differ, a held-out split over combinations;
the editor's velocity with the reference image in context."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel

from tempocache.reference.edits import (KINDS, check_instruction, held_out_edits, render_edit, sample_edit,
                                        sample_edit_batch, vocabulary)
from tempocache.reference.models import (TEXT_DIM, edit_velocity, get_spec, load_grown, load_weights,
                                         make_tokenizer)
from tempocache.reference.shapesworld import parse_caption
from tempocache.reference.text import WordEncoder
from tempocache.reference.train import train_reference


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


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=12, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                                  axes_dims_rope=(4, 6, 6)).eval()


def test_the_edited_image_takes_its_reference_in_context_as_flux_kontext_places_it():
    transformer, g = tiny_flux(), torch.Generator().manual_seed(0)
    x, reference = (torch.randn(2, 3, 1, 8, 8, generator=g) for _ in range(2))
    sigma, text = torch.tensor([0.3, 0.7]), torch.randn(2, 5, TEXT_DIM, generator=g)
    with torch.no_grad():
        out = edit_velocity(transformer, x, reference, sigma, text)
        pack, ids = FluxKontextPipeline._pack_latents, FluxKontextPipeline._prepare_latent_image_ids
        reference_ids = ids(2, 4, 4, "cpu", torch.float32)
        reference_ids[..., 0] = 1  # as FluxKontextPipeline.prepare_latents offsets the image it edits
        direct = transformer(hidden_states=torch.cat([pack(x[:, :, 0], 2, 3, 8, 8), pack(reference[:, :, 0], 2, 3, 8, 8)], 1),
                             encoder_hidden_states=text, pooled_projections=text.mean(1), timestep=sigma,
                             img_ids=torch.cat([ids(2, 4, 4, "cpu", torch.float32), reference_ids]),
                             txt_ids=torch.zeros(5, 3), return_dict=False)[0][:, :16]
        torch.testing.assert_close(pack(out[:, :, 0], 2, 3, 8, 8), direct)
        assert not torch.allclose(edit_velocity(transformer, x, reference.flip(-1), sigma, text), out)  # it is read
    with pytest.raises(ValueError, match="shaped as the image made"):
        edit_velocity(transformer, x, reference[..., :4], sigma, text)
    with pytest.raises(TypeError, match="FluxTransformer2DModel"):
        edit_velocity(torch.nn.Linear(2, 2), x, reference, sigma, text)


def test_an_edit_batch_is_its_edits_rendered():
    batch = sample_edit_batch(np.random.default_rng(5), 6, "held_out")
    assert batch.sources.shape == batch.targets.shape == (6, 3, 32, 32) and batch.masks.shape == (6, 32, 32)
    for i, edit in enumerate(batch.edits):
        assert edit.is_held_out() and batch.instructions()[i] == edit.instruction
        assert all(torch.equal(a, b[i]) for a, b in zip(render_edit(edit), (batch.sources, batch.targets, batch.masks)))


def test_the_editor_starts_from_shapes_t2i_and_trains(tmp_path):
    editor, generator = get_spec("shapes-edit"), get_spec("shapes-t2i")
    captions, instructions = make_tokenizer(generator), make_tokenizer(editor)
    caption = "a red circle and a blue square on a black background"
    assert torch.equal(captions([caption]), instructions([caption]))  # a caption's words keep their ids
    instructions(["make the red circle blue", "move the blue square left"])  # every instruction's words
    small, grown = (WordEncoder(len(t.words), 20, TEXT_DIM) for t in (captions, instructions))
    before = grown.embed.weight[len(captions.words):].clone()
    load_grown(grown, small)
    assert torch.equal(grown.embed.weight[:len(captions.words)], small.embed.weight)
    assert torch.equal(grown.embed.weight[len(captions.words):], before)  # the new words keep their own
    state = train_reference("shapes-edit", tmp_path, minutes=0.02, batch_size=2, device="cpu", workers=0, log_every=1)
    assert state["steps"] >= 1 and state["init_from"] == "shapes-t2i"
    assert all(np.isfinite(loss) for _, loss in state["losses"])
    transformer, text_encoder = load_weights(tmp_path, editor)
    assert text_encoder.config["vocab_size"] == len(instructions.words)


def test_the_edit_judge_finds_the_ground_truth_right_and_the_unedited_source_wrong():
    from tempocache.eval.edit_quality import judge_edits
    from tempocache.eval.evaluator import load_evaluator

    evaluator, listed = load_evaluator(), held_out_edits(50)
    sources, targets, masks = (torch.stack(t) for t in zip(*(render_edit(e) for e in listed)))
    right, unedited = judge_edits(evaluator, targets, listed), judge_edits(evaluator, sources, listed)
    assert np.mean([r["changed"] for r in right]) >= 0.85 and np.mean([r["kept"] for r in right]) >= 0.85
    assert not any(r["changed"] for r in unedited)  # no change, none found
    assert all(r["psnr_outside"] == float("inf") for r in right)
    noisy = targets + 0.05 * torch.randn(targets.shape, generator=torch.Generator().manual_seed(0)) * ~masks[:, None]
    assert all(20 < r["psnr_outside"] < 40 for r in judge_edits(evaluator, noisy.clamp(0, 1), listed))
    with pytest.raises(ValueError, match="49 images for 50 edits"):
        judge_edits(evaluator, targets[:49], listed)


def test_an_added_object_may_go_anywhere_the_rest_is_judged_outside_it():
    from tempocache.eval.edit_quality import judge_edits
    from tempocache.eval.evaluator import load_evaluator
    from tempocache.reference.shapesworld import render

    listed = [e for e in held_out_edits(40) if e.kind == "add"][:4]
    elsewhere = []
    for edit in listed:
        added = next(i for i, o in enumerate(edit.target.objects) if o not in edit.source.objects)
        layout = edit.target_layout.copy()
        layout[added, :2] = 32 - layout[added, :2]  # the new object mirrored to the other side of the frame
        elsewhere.append(render(edit.target, layout, 1, 32)[0])
    judged = judge_edits(load_evaluator(), torch.stack(elsewhere), listed)
    targets = torch.stack([render_edit(e)[1] for e in listed])
    strict = [10 * np.log10(1 / (t - i).square()[:, ~render_edit(e)[2]].mean().item())
              for t, i, e in zip(targets, torch.stack(elsewhere), listed)]
    assert all(r["psnr_outside"] > 40 for r in judged) and min(strict) < 30
