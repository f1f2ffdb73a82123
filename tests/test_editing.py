"""Editing: the pipeline with the image it edits in context, `tempocache.edit`, the `edit` command; bad input
refused before any compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tempocache as tc
from tempocache.editing import load_image
from tempocache.reference.edits import held_out_edits, render_edit
from tempocache.reference.models import TEXT_DIM, edit_velocity, get_spec, make_scheduler, make_tokenizer
from tempocache.reference.pipeline import ShapesPipeline
from tempocache.reference.text import WordEncoder
from test_edits import tiny_flux

SIZE = 32
INSTRUCTION = "make the red square blue"


def tiny_editor() -> ShapesPipeline:
    spec = get_spec("shapes-edit")
    torch.manual_seed(0)
    text_encoder = WordEncoder(len(make_tokenizer(spec).words), 20, TEXT_DIM).eval()
    return ShapesPipeline(tiny_flux(), text_encoder, make_scheduler(), spec)


def sources(count: int = 2) -> tuple[torch.Tensor, list[str]]:
    listed = held_out_edits(count)
    return torch.stack([render_edit(e)[0] for e in listed]), [e.instruction for e in listed]


def test_the_editor_samples_with_the_image_it_edits_in_context(one_thread):
    pipe, (images, instructions) = tiny_editor(), sources()
    out = pipe(instructions, num_inference_steps=3, image=images, seed=4).frames
    assert out.shape == (2, 1, SIZE, SIZE, 3) and np.isfinite(out).all()
    again = pipe(instructions, num_inference_steps=3, image=images, seed=4).frames
    assert np.array_equal(out, again)
    other = pipe(instructions, num_inference_steps=3, image=images.flip(-1), seed=4).frames
    assert not np.allclose(out, other)  # the image is read
    batched = pipe(instructions, num_inference_steps=3, image=images, seed=4, batch_cfg=True).frames
    np.testing.assert_allclose(batched, out, atol=1e-5)
    # the same loop by hand: Euler steps on the guided velocity, the image and the empty instruction unconditional
    ids = pipe.tokenizer(instructions[:1])
    text, empty = pipe.encode(ids), pipe.encode(torch.zeros_like(ids))
    x = torch.randn(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))[None]
    reference = images[:1, :, None] * 2 - 1
    pipe.scheduler.set_timesteps(3)
    sigmas = pipe.scheduler.sigmas
    with torch.no_grad():
        for sigma, following in zip(sigmas, sigmas[1:]):
            s = sigma[None]
            v = edit_velocity(pipe.transformer, x, reference, s, text)
            v_uncond = edit_velocity(pipe.transformer, x, reference, s, empty)
            x = x + (following - sigma) * (v_uncond + 2.0 * (v - v_uncond))
    np.testing.assert_allclose(out[0], ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)[0].numpy(), atol=1e-5)


def test_tempocache_edit_takes_files_pil_images_arrays_and_tensors(tmp_path, one_thread):
    pipe, (images, instructions) = tiny_editor(), sources(1)
    pixels = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    forms = [tmp_path / "in.png", str(tmp_path / "in.png"), Image.fromarray(pixels), pixels, torch.from_numpy(pixels).permute(2, 0, 1) / 255]
    outs = [tc.edit(f, instructions[0], steps=2, pipe=pipe) for f in forms]
    assert outs[0].shape == (SIZE, SIZE, 3)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    pair = tc.edit([forms[0], forms[0]], [instructions[0], INSTRUCTION], steps=2, pipe=pipe, seed=0)
    assert pair.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(pair[0], outs[0], atol=1e-5)  # a batch of two: the first pair as alone


@pytest.mark.parametrize("image, message", [
    (Image.new("RGBA", (SIZE, SIZE)), "mode 'RGBA'"),
    (Image.new("L", (SIZE, SIZE)), "mode 'L'"),
    (Image.new("RGB", (64, 32)), "edits 32x32 images, got 64x32"),
    (np.zeros((SIZE, SIZE)), r"\(H, W, 3\) RGB"),
    (np.full((SIZE, SIZE, 3), 2.0), r"in \[0, 1\]"),
    (torch.zeros(4, SIZE, SIZE), r"\(3, H, W\) RGB"),
    ("no/such/file.png", "no image file"),
    (3, "not int"),
])
def test_a_bad_image_is_refused_naming_what_is_accepted(image, message):
    with pytest.raises(ValueError, match=message):
        load_image(image, SIZE)


def test_bad_edits_are_refused_before_any_compute(monkeypatch):
    pipe, (images, _) = tiny_editor(), sources(1)
    monkeypatch.setattr(pipe, "transformer", None)  # any compute would fail otherwise than with the error checked
    for instruction, message in (("make the red square purple-ish", "unknown word"),
                                 ("make the square red", "is not an edit"),
                                 ("remove a red square", "is not an edit")):
        with pytest.raises(ValueError, match=message):
            tc.edit(images[0], instruction, pipe=pipe)
    with pytest.raises(ValueError, match="2 images for 1 instructions"):
        tc.edit([images[0], images[0]], [INSTRUCTION], pipe=pipe)
    with pytest.raises(ValueError, match=r"shaped \(1, 3, 32, 32\)"):
        pipe([INSTRUCTION], image=images[:, :, :16])
    with pytest.raises(ValueError, match="edits an image: pass image"):
        pipe([INSTRUCTION])


def test_a_generator_takes_no_image_and_is_no_editor():
    generator = ShapesPipeline(tiny_flux(), WordEncoder(len(make_tokenizer().words), 20, TEXT_DIM), make_scheduler())
    assert generator.spec.name == "shapes-t2i"
    with pytest.raises(ValueError, match="takes no image"):
        generator(["a red square on a black background"], image=torch.zeros(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="not an editor"):
        tc.edit(torch.zeros(3, SIZE, SIZE), INSTRUCTION, pipe=generator)


def test_the_edit_command_writes_a_png_and_refuses_other_outputs_first(tmp_path, monkeypatch, capsys, one_thread):
    from tempocache import editing
    from tempocache.cli import main

    monkeypatch.setattr(editing, "load_pipeline", lambda model, device: tiny_editor())
    images, instructions = sources(1)
    Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "in.png")
    assert main(["edit", str(tmp_path / "in.png"), instructions[0], "-o", str(tmp_path / "out.png"), "--steps", "2",
                 "--scale", "2"]) == 0
    with Image.open(tmp_path / "out.png") as written:
        assert written.size == (2 * SIZE, 2 * SIZE) and written.mode == "RGB"
    assert main(["edit", str(tmp_path / "in.png"), instructions[0], "-o", str(tmp_path / "out.gif")]) == 2
    assert "written as .png" in capsys.readouterr().err and not (tmp_path / "out.gif").exists()
    assert main(["edit", str(tmp_path / "in.png"), "paint it", "-o", str(tmp_path / "x.png")]) == 2
    assert "unknown word" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_the_shipped_editor_is_no_generator():
    with pytest.raises(ValueError, match="is an editor"):
        tc.generate(["a red square on a black background"], model="shapes-edit")


def test_an_editor_is_evaluated_per_kind_on_held_out_edits(monkeypatch, one_thread):
    import tempocache.generation as generation
    from tempocache.eval.edit_quality import evaluate_editor

    monkeypatch.setattr(generation, "load_pipeline", lambda *a, **k: tiny_editor())
    result = evaluate_editor(edits=5, steps=2, batch_size=2)
    assert result["edits"] == 5 and result["steps"] == 2
    assert set(result["quality"]) == {"recolour", "remove", "add", "move", "background", "local"}
    assert all(q["edits"] == 1 for k, q in result["quality"].items() if k != "local")
    with pytest.raises(ValueError, match="at least one edit of each"):
        evaluate_editor(edits=3)


def test_an_unknown_word_lists_the_instructions_vocabulary():
    pipe, (images, _) = tiny_editor(), sources(1)
    with pytest.raises(ValueError, match="instructions use only") as error:
        tc.edit(images[0], "paint it blue", pipe=pipe)
    assert "moves" not in str(error.value)  # a caption's word, no instruction's
