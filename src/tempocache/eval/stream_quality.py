"""How a streaming model holds up over a long rollout: the drift curve (`tempocache eval-stream`).

Held-out captions are streamed side by side, each with its KV policy; every `every` frames
an 8-frame window (the evaluator's input) is read by the streaming evaluator (trained on
endless clips, `evaluator.STREAM_EVALUATOR_DIR`): semantic accuracy per attribute, the
Fréchet distance to real endless clips at the same point (and real against real, its
floor), and, for each bounded policy, PSNR against the full-KV rollout of the same seeds;
the KV bytes held along the rollout, peak memory, and a lone stream's time to first
frame and frames per second.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..kv import FullKV, KVConfig
from ..step_cache import StepCacheConfig, enabled
from ..reference import shapesworld
from .evaluator import INPUT_FRAMES, STREAM_EVALUATOR_DIR, load_evaluator
from .fidelity import fidelity
from .metrics import frechet_distance, read_clips, semantic_accuracy

REAL_SEED = 10_000


@dataclass(frozen=True)
class Method:
    """A KV policy, with the step cache on the chunk denoiser or without."""

    kv: KVConfig
    step_cache: StepCacheConfig | None = None

    def running(self, pipe) -> contextlib.AbstractContextManager:
        return enabled(pipe, self.step_cache) if self.step_cache is not None else contextlib.nullcontext()


def real_stream_windows(scenes: list, starts: list[int], seed: int, size: int) -> np.ndarray:
    """Rendered endless clips of `scenes`: (windows, N, INPUT_FRAMES, H, W, 3) at each start."""
    rng = np.random.default_rng(seed)
    layouts = [shapesworld.stream_layout(rng, s, size) for s in scenes]
    return np.stack([np.stack([shapesworld.render_stream(s, l, start, INPUT_FRAMES, size).permute(0, 2, 3, 1).numpy()
                               for s, l in zip(scenes, layouts)]) for start in starts])


def evaluate_stream(pipe, policies: dict[str, KVConfig | Method], captions: int = 64, frames: int = 512,
                    every: int = 32, steps: int | None = None, guidance: float | None = None, seed: int = 0,
                    device: str = "cpu", full_kv: bool = True, timing_chunks: int = 8, keep_samples: int = 0,
                    progress: Callable[[dict], None] | None = None) -> dict:
    """The drift curve of each KV policy (by name; a `Method` adds a step cache) over `frames` frames of `captions`
    held-out captions; with `full_kv`, also of full KV, the reference the others' PSNR is measured against (its
    memory grows with length). Each policy also streams the first caption alone for `timing_chunks` chunks: time
    to first frame, frames/s. `keep_samples`: the clips of that many captions per policy, under "samples" (arrays:
    not for JSON). `progress(result)` is called after each policy with the result so far."""
    spec = pipe.spec
    if captions < 2 or frames < INPUT_FRAMES or every < 1:
        raise ValueError(f"need at least 2 captions, {INPUT_FRAMES} frames and every >= 1, got {captions}, {frames}, {every}")
    policies = {"full KV": FullKV(), **policies} if full_kv else dict(policies)
    methods = {name: m if isinstance(m, Method) else Method(m) for name, m in policies.items()}
    for method in methods.values():
        method.kv.check(spec.chunk_frames)
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
    for name, method in methods.items():
        with method.running(pipe):
            row = {"kv": repr(method.kv), **_rollout_cost(pipe, prompts, frames, method.kv, steps, guidance, seed, every)}
            row["timing"] = _timing(pipe, prompts[0], method.kv, steps, guidance, seed, timing_chunks)
        if method.step_cache is not None:
            row["step_cache"] = repr(method.step_cache)
        clips = row.pop("clips")
        windows = [clips[:, s:s + INPUT_FRAMES] for s in starts]
        read = [read_clips(evaluator, w) for w in windows]
        row["accuracy"] = [semantic_accuracy(logits, scenes) for _, logits in read]
        row["frechet"] = [frechet_distance(f, real) for (f, _), real in zip(read, real_features)]
        if name == "full KV":
            reference = clips
        elif reference is not None:
            row["psnr_vs_full_kv"] = [fidelity(w, reference[:, s:s + INPUT_FRAMES])["psnr"] for s, w in zip(starts, windows)]
        result["policies"][name] = row
        if keep_samples:
            result.setdefault("samples", {})[name] = clips[:keep_samples]
        if progress is not None:
            progress(result)
    return result


def _rollout_cost(pipe, prompts, frames, config, steps, guidance, seed, every) -> dict:
    """The clips (N, T, H, W, 3) of one batched rollout, its seconds, and the KV bytes held every `every` frames."""
    from ..streaming import stream

    device = pipe.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s, chunks, kv_bytes = stream(pipe, prompts, frames, config, steps, guidance, seed), [], {}
    begin = time.perf_counter()
    for chunk in s:
        chunks.append(chunk)
        if s.made % every == 0 or s.made == frames:
            kv_bytes[s.made] = s.stats()["kv_bytes"]
    return {"seconds": round(time.perf_counter() - begin, 1), "kv_bytes": kv_bytes, "clips": np.concatenate(chunks, 1),
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def _timing(pipe, prompt, config, steps, guidance, seed, chunks: int) -> dict:
    """One stream alone, as a user runs it: time to its first chunk, then frames per second (median chunk)."""
    from ..streaming import stream

    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    s, times = stream(pipe, prompt, chunks * pipe.spec.chunk_frames, config, steps, guidance, seed), []
    sync()
    start = time.perf_counter()
    for _ in s:  # the chunk is on the host when it is yielded
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
    later = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"time_to_first_frame_s": round(times[0], 4), "fps": pipe.spec.chunk_frames / later, "chunks": chunks}
