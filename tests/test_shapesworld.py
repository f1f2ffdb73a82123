import hashlib

import numpy as np
import pytest
import torch

from tempocache.reference import shapesworld as sw


def pixels_hash(clip: torch.Tensor) -> str:
    return hashlib.sha256((clip * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()


def test_same_seed_same_clip_on_any_machine():
    scene = sw.parse_caption("a red square moves right and a cyan triangle grows on a gray background")
    # Recorded once; rendering is plain float32 arithmetic, so it must not drift across machines.
    assert pixels_hash(sw.make_clip(scene, 7)) == "4571c86f17dbca97caf3f8e4ed58f2507812f69e27545ba5fadd7dde11338f50"
    assert torch.equal(sw.make_clip(scene, 7), sw.make_clip(scene, 7))
    assert not torch.equal(sw.make_clip(scene, 7), sw.make_clip(scene, 8))


def test_batches_are_deterministic_for_a_seed():
    a = sw.sample_batch(np.random.default_rng(3), 6)
    b = sw.sample_batch(np.random.default_rng(3), 6)
    c = sw.sample_batch(np.random.default_rng(4), 6)
    assert a.captions() == b.captions() and torch.equal(a.clips, b.clips)
    assert a.captions() != c.captions()
    assert a.clips.shape == (6, 8, 3, 32, 32) and 0 <= a.clips.min() and a.clips.max() <= 1


def test_frames_and_size_are_configurable():
    scene = sw.parse_caption("a blue circle moves down on a white background")
    assert sw.make_clip(scene, 0, num_frames=16, size=48).shape == (16, 3, 48, 48)


def _mask(clip: torch.Tensor, colour: str) -> torch.Tensor:
    """(T, H, W) pixels of exactly `colour` (soft edges excluded)."""
    target = torch.tensor({**sw.BACKGROUNDS, **sw.COLOURS}[colour]).view(1, 3, 1, 1) / 255
    return ((clip - target).abs().amax(1) < 0.02).float()


def _coverage(clip: torch.Tensor, colour: str, background: str) -> torch.Tensor:
    """(T, H, W) fraction of each pixel covered by a lone object of `colour`, soft edges included."""
    target = torch.tensor(sw.COLOURS[colour]).view(1, 3, 1, 1) / 255
    bg = torch.tensor(sw.BACKGROUNDS[background]).view(1, 3, 1, 1) / 255
    return ((clip - bg) * (target - bg)).sum(1) / ((target - bg) ** 2).sum(1)


def _centroids(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(mask.shape[1]), torch.arange(mask.shape[2]), indexing="ij")
    area = mask.sum((1, 2))
    return torch.stack([(mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area], 1)


@pytest.mark.parametrize("motion", sw.MOTION_NAMES)
def test_clip_shows_its_caption(motion):
    scene = sw.Scene((sw.ShapeObject("square", "red", motion),), "black")
    for seed in range(5):
        clip = sw.make_clip(scene, seed)
        mask = _coverage(clip, "red", "black")
        assert mask.sum((1, 2)).min() > 20, "the object is visible in every frame"
        assert (_mask(clip, "red") + _mask(clip, "black")).mean() > 0.9, "all else is background, but for soft edges"
        moved = _centroids(mask)[-1] - _centroids(mask)[0]
        grew = mask[-1].sum() / mask[0].sum()
        expected = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "static": (0, 0), "grow": (0, 0)}[motion]
        for axis in range(2):
            if expected[axis]:
                assert moved[axis] * expected[axis] > 8, f"{motion}: centroid moved {moved.tolist()}"
            else:
                assert abs(moved[axis]) < 0.5
        assert (grew > 2.0) if motion == "grow" else (abs(grew - 1) < 0.1)


@pytest.mark.parametrize("shape, fill", [("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)])
def test_shapes_fill_their_bounding_box_as_they_should(shape, fill):
    scene = sw.Scene((sw.ShapeObject(shape, "yellow", "static"),), "blue")
    mask = _coverage(sw.make_clip(scene, 1, size=128), "yellow", "blue")[0]
    rows, cols = (mask > 0.5).any(1).nonzero(), (mask > 0.5).any(0).nonzero()
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert mask.sum() / box == pytest.approx(fill, abs=0.04)


def test_two_objects_have_distinct_colours_and_both_show():
    rng = np.random.default_rng(0)
    for _ in range(30):
        scene = sw.sample_scene(rng, count=2)
        colours = [o.colour for o in scene.objects]
        assert len(set(colours)) == 2 and scene.background not in colours
        assert colours == sorted(colours, key=sw.COLOUR_NAMES.index), "caption lists objects in colour order"
        clip = sw.make_clip(scene, 0)
        for colour in colours:
            assert _mask(clip, colour).sum((1, 2)).min() > 5


def test_captions_round_trip_through_the_grammar():
    rng = np.random.default_rng(1)
    words = set(sw.vocabulary())
    for _ in range(200):
        scene = sw.sample_scene(rng, "all")
        assert sw.parse_caption(scene.caption()) == scene
        assert set(scene.caption().split()) <= words
        image = sw.sample_scene(rng, "all", with_motion=False)
        assert sw.parse_caption(image.caption(with_motion=False)) == image
    for bad in ["a red circle", "a purple circle on a black background", "a red blob moves left on a black background",
                "a red circle flies on a black background", "a red circle and a blue square and a green circle on a black background"]:
        with pytest.raises(ValueError):
            sw.parse_caption(bad)


def test_train_and_held_out_splits_are_disjoint_and_cover_every_value():
    rng = np.random.default_rng(2)
    train = [sw.sample_scene(rng, "train") for _ in range(500)]
    held = sw.held_out_scenes(64)
    assert not any(s.is_held_out() for s in train)
    assert all(s.is_held_out() for s in held) and len({s.caption() for s in held}) == 64
    train_tuples = {c for s in train for c in s.combinations()}
    assert not train_tuples & {c for s in held for c in s.combinations() if sw.is_held_out_combination(*c)}
    for values, index in [(sw.SHAPES, 0), (sw.COLOUR_NAMES, 1), (sw.MOTION_NAMES, 2), (sw.BACKGROUND_NAMES, 3)]:
        assert {c[index] for c in train_tuples} == set(values)
    with pytest.raises(ValueError, match="splits are"):
        sw.sample_scene(rng, "test")
