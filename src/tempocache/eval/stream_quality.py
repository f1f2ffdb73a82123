"""How a streaming model holds up over a long rollout: the drift curve (`tempocache eval-stream`).

Held-out captions are streamed side by side, each with its KV policy; every `every` frames
an 8-frame window (the evaluator's input) is read by the streaming evaluator (trained on
endless clips, `evaluator.STREAM_EVALUATOR_DIR`): semantic accuracy per attribute, the
Fréchet distance to real endless clips at the same point (and real against real, its
floor), and, for each bounded policy, PSNR against the full-KV rollout of the same seeds.
"""

from __future__ import annotations

import time

import numpy as np

from ..kv import FullKV, KVConfig
from ..reference import shapesworld
from .evaluator import INPUT_FRAMES, STREAM_EVALUATOR_DIR, load_evaluator
from .fidelity import fidelity
from .metrics import frechet_distance, read_clips, semantic_accuracy

REAL_SEED = 10_000


def real_stream_windows(scenes: list, starts: list[int], seed: int, size: int) -> np.ndarray:
    """Rendered endless clips of `scenes`: (windows, N, INPUT_FRAMES, H, W, 3) at each start."""
    rng = np.random.default_rng(seed)
    layouts = [shapesworld.stream_layout(rng, s, size) for s in scenes]
    return np.stack([np.stack([shapesworld.render_stream(s, l, start, INPUT_FRAMES, size).permute(0, 2, 3, 1).numpy()
                               for s, l in zip(scenes, layouts)]) for start in starts])


def evaluate_stream(pipe, policies: dict[str, KVConfig], captions: int = 64, frames: int = 512, every: int = 32,
                    steps: int | None = None, guidance: float | None = None, seed: int = 0, device: str = "cpu",
                    full_kv: bool = True) -> dict:
    """The drift curve of each KV policy (by name) over `frames` frames of `captions` held-out captions; with
    `full_kv`, also of full KV, the reference the others' PSNR is measured against (its memory grows with length)."""
    from ..streaming import stream

    spec = pipe.spec
    if captions < 2 or frames < INPUT_FRAMES or every < 1:
        raise ValueError(f"need at least 2 captions, {INPUT_FRAMES} frames and every >= 1, got {captions}, {frames}, {every}")
    policies = {"full KV": FullKV(), **policies} if full_kv else dict(policies)
    for config in policies.values():
        config.check(spec.chunk_frames)
    scenes = shapesworld.held_out_scenes(captions, seed, motions=shapesworld.STREAM_MOTIONS)
    prompts = [s.caption() for s in scenes]
    starts = list(range(0, frames - INPUT_FRAMES + 1, every))
    evaluator = load_evaluator(device, STREAM_EVALUATOR_DIR)
    real_a = real_stream_windows(scenes, starts, REAL_SEED + seed, spec.size)
    real_b = real_stream_windows(scenes, starts, 2 * REAL_SEED + seed, spec.size)
    real_features = [read_clips(evaluator, w)[0] for w in real_a]
    floor = [frechet_distance(f, read_clips(evaluator, w)[0]) for f, w in zip(real_features, real_b)]
    result = {"model": spec.name, "captions": captions, "frames": frames, "every": every,
              "steps": steps or spec.default_steps, "guidance": guidance or spec.default_guidance, "seed": seed,
              "starts": starts, "frechet_real_vs_real": floor, "policies": {}}
    reference = None
    for name, config in policies.items():
        begin = time.time()
        clips = np.concatenate(list(stream(pipe, prompts, frames, config, steps, guidance, seed)), axis=1)  # (N, T, ...)
        seconds = time.time() - begin
        windows = [clips[:, s:s + INPUT_FRAMES] for s in starts]
        read = [read_clips(evaluator, w) for w in windows]
        row = {"kv": repr(config), "seconds": round(seconds, 1),
               "accuracy": [semantic_accuracy(logits, scenes) for _, logits in read],
               "frechet": [frechet_distance(f, real) for (f, _), real in zip(read, real_features)]}
        if name == "full KV":
            reference = clips
        elif reference is not None:
            row["psnr_vs_full_kv"] = [fidelity(w, reference[:, s:s + INPUT_FRAMES])["psnr"] for s, w in zip(starts, windows)]
        result["policies"][name] = row
    return result
