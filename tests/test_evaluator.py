import numpy as np
import pytest

from tempocache.eval.evaluator import load_evaluator
from tempocache.eval.metrics import frechet_distance, read_clips, semantic_accuracy
from tempocache.eval.reference_eval import evaluate_evaluator, real_clips
from tempocache.reference import shapesworld as sw


def test_evaluator_reads_held_out_real_clips_and_images():
    report = evaluate_evaluator(count=192, seed=5)
    for kind in ("clip_accuracy", "image_accuracy"):
        for attribute, accuracy in report[kind].items():
            if attribute != "all":
                assert accuracy >= 0.95, (kind, attribute, accuracy)


def test_semantic_accuracy_scores_the_captioned_attributes():
    scene = sw.parse_caption("a red square moves left and a blue circle grows on a black background")
    logits = {
        "background": np.array([[5.0, 0, 0, 0]]),
        "present": np.full((1, 7), -5.0),
        "shape": np.zeros((1, 7, 3)),
        "motion": np.zeros((1, 7, 6)),
    }
    red, blue = sw.COLOUR_NAMES.index("red"), sw.COLOUR_NAMES.index("blue")
    logits["present"][0, [red, blue]] = 5
    logits["shape"][0, red, sw.SHAPES.index("square")] = 5
    logits["shape"][0, blue, sw.SHAPES.index("triangle")] = 5  # wrong shape
    logits["motion"][0, red, sw.MOTION_NAMES.index("left")] = 5
    logits["motion"][0, blue, sw.MOTION_NAMES.index("grow")] = 5
    acc = semantic_accuracy(logits, [scene])
    assert acc == {"background": 1.0, "colour": 1.0, "shape": 0.5, "motion": 1.0, "count": 1.0, "all": 0.0}
    logits["present"][0, blue] = -5  # the blue object is missing: its shape and motion cannot be right
    acc = semantic_accuracy(logits, [scene])
    assert acc["colour"] == 0.5 and acc["motion"] == 0.5 and acc["count"] == 0.0


def test_frechet_distance_separates_real_clips_from_noisy_clips_and_other_captions():
    evaluator = load_evaluator()
    scenes = sw.held_out_scenes(128)
    a = read_clips(evaluator, real_clips(scenes, 8, seed=0))[0]
    b = read_clips(evaluator, real_clips(scenes, 8, seed=100))[0]
    clean = real_clips(scenes, 8, seed=200)
    noisy = np.clip(clean + 0.15 * np.random.default_rng(0).standard_normal(clean.shape), 0, 1).astype(np.float32)
    others = real_clips(sw.held_out_scenes(128, seed=9), 8, seed=300)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-3)
    same = frechet_distance(a, b)  # the floor that sampling alone gives
    assert frechet_distance(a, read_clips(evaluator, noisy)[0]) > 1.15 * same
    assert frechet_distance(a, read_clips(evaluator, others)[0]) > 1.4 * same
