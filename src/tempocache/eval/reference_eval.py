"""How good the shipped models are at their world (`tempocache eval-reference`).

Samples held-out captions (combinations never trained on) with full compute and
scores them with the evaluator: semantic accuracy, and the Fréchet distance between
generated clips and real clips of the same captions (next to the distance between
two independent sets of real clips, the floor that sample noise alone gives).
"""

from __future__ import annotations

import datetime
import platform
import time

import numpy as np
import torch

from ..generation import generate, load_pipeline
from ..reference import shapesworld
from ..reference.models import get_spec
from .evaluator import load_evaluator
from .metrics import frechet_distance, read_clips, semantic_accuracy

REAL_SEED_OFFSET = 1_000_000


def real_clips(scenes: list[shapesworld.Scene], num_frames: int, seed: int) -> np.ndarray:
    """Rendered clips (N, T, H, W, 3) of `scenes`, scene i placed by seed `seed + i`."""
    return np.stack([shapesworld.make_clip(s, seed + i, num_frames).permute(0, 2, 3, 1).numpy() for i, s in enumerate(scenes)])


def evaluate_reference(
    model: str, captions: int = 64, steps: int | None = None, guidance: float | None = None,
    device: str = "cpu", batch_size: int = 16, seed: int = 0, samples_per_caption: int = 1, num_frames: int | None = None,
) -> dict:
    """Sample each held-out caption `samples_per_caption` times (seeds seed, seed + 1, ...) and score the clips
    (`num_frames` long; default: the model's length).

    The Fréchet distance is biased upwards by few samples: compare it with the real-vs-real floor.
    """
    spec = get_spec(model)
    if captions < 2 or samples_per_caption < 1:
        raise ValueError(f"need at least 2 captions and 1 sample per caption, got {captions} and {samples_per_caption}")
    pipe = load_pipeline(model, device)
    num_frames = num_frames or spec.num_frames
    evaluator = load_evaluator(device)
    scenes = shapesworld.held_out_scenes(captions, seed, with_motion=spec.is_video) * samples_per_caption
    prompts = [s.caption(spec.is_video) for s in scenes]
    start = time.time()
    generated = generate(prompts, steps=steps, guidance=guidance, seed=seed, num_frames=num_frames, device=device,
                         batch_size=batch_size, pipe=pipe)
    seconds = time.time() - start
    real_a = real_clips(scenes, num_frames, REAL_SEED_OFFSET + seed)
    real_b = real_clips(scenes, num_frames, 2 * REAL_SEED_OFFSET + seed)
    features, logits = read_clips(evaluator, generated)
    features_a, logits_a = read_clips(evaluator, real_a)
    features_b, _ = read_clips(evaluator, real_b)
    two_objects = [i for i, s in enumerate(scenes) if len(s.objects) == 2]
    return {
        "model": model,
        "captions": captions,
        "samples_per_caption": samples_per_caption,
        "frames": num_frames,
        "two_object_captions": len(two_objects) // samples_per_caption,
        "steps": spec.default_steps if steps is None else steps,
        "guidance": spec.default_guidance if guidance is None else guidance,
        "seed": seed,
        "semantic_accuracy": semantic_accuracy(logits, scenes, spec.is_video),
        "semantic_accuracy_two_objects": semantic_accuracy({k: v[two_objects] for k, v in logits.items()},
                                                           [scenes[i] for i in two_objects], spec.is_video),
        "real_clip_accuracy": semantic_accuracy(logits_a, scenes, spec.is_video),
        "frechet_distance": frechet_distance(features, features_a),
        "frechet_distance_real_vs_real": frechet_distance(features_b, features_a),
        "sampling_seconds": round(seconds, 1),
        "device": torch.cuda.get_device_name() if str(device).startswith("cuda") else f"cpu ({platform.processor() or platform.machine()})",
        "date": datetime.date.today().isoformat(),
    }


def format_table(results: dict[str, dict]) -> str:
    attributes = ["colour", "shape", "motion", "background", "count", "all"]
    lines = ["| model | captions | " + " | ".join(attributes) + " | Fréchet (real vs real) |",
             "|---" * (len(attributes) + 3) + "|"]
    for name, r in results.items():
        acc = r["semantic_accuracy"]
        cells = [f"{acc[a]:.3f}" if a in acc else "-" for a in attributes]
        lines.append(f"| {name} | {r['captions']} | " + " | ".join(cells)
                     + f" | {r['frechet_distance']:.2f} ({r['frechet_distance_real_vs_real']:.2f}) |")
    return "\n".join(lines)


def evaluate_evaluator(count: int = 2048, seed: int = 0, device: str = "cpu", num_frames: int = shapesworld.DEFAULT_FRAMES) -> dict:
    """The evaluator's own accuracy on fresh real clips of held-out captions (`num_frames` long), as clips and as
    single frames."""
    evaluator = load_evaluator(device)
    batch = shapesworld.sample_batch(np.random.default_rng([seed, 424242]), count, "held_out", num_frames)
    clips = batch.clips.permute(0, 1, 3, 4, 2)
    images = shapesworld.sample_batch(np.random.default_rng([seed, 434343]), count, "held_out", num_frames=1, with_motion=False)
    return {
        "clips": count,
        "frames": num_frames,
        "clip_accuracy": semantic_accuracy(read_clips(evaluator, clips)[1], batch.scenes),
        "image_accuracy": semantic_accuracy(read_clips(evaluator, images.clips.permute(0, 1, 3, 4, 2))[1], images.scenes, with_motion=False),
    }
