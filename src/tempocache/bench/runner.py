"""`tempocache bench`: every method on the same model, captions and seeds, in one process.

For each setting: one pass over all captions x seeds (its clips are scored; it also warms
the method up), then `repeats` timed passes over the first batch, whose median is the
wall-clock; speedups are against full compute timed the same way in the same run. Block
compute is counted the same way for every method: the multiply-adds of the linear layers
inside the transformer blocks that actually ran, against full compute's.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..eval.evaluator import load_evaluator
from ..eval.fidelity import fidelity
from ..eval.metrics import frechet_distance, read_clips, semantic_accuracy
from ..eval.reference_eval import REAL_SEED_OFFSET, real_clips
from ..generation import load_pipeline
from ..models import find_blocks
from ..quant.linear import QuantLinear
from ..reference import shapesworld
from ..reference.models import get_spec
from .methods import Group, Setting, select


@dataclass
class Workload:
    prompts: list[str]
    scenes: list[shapesworld.Scene]
    seeds: list[int]  # one noise seed per prompt
    steps: int
    guidance: float
    frames: int
    batch_size: int


def read_prompts(path: Path) -> list[str]:
    """Captions, one per line (blank lines skipped), each checked against the shipped models' grammar."""
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read prompts file {str(path)!r}: {error}") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"prompts file {str(path)!r} has no captions (one per line)")
    for number, line in enumerate(lines, 1):
        if line:
            try:
                shapesworld.parse_caption(line)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: {error}") from None
    return prompts


class BlockComputeCounter:
    """Multiply-adds of the linear layers inside the transformer's blocks, as they run."""

    def __init__(self, transformer: torch.nn.Module):
        blocks = find_blocks(transformer).modules
        self.linears = [m for block in blocks for m in block.modules() if isinstance(m, (torch.nn.Linear, QuantLinear))]
        self.total = 0
        self.handles = []

    def _count(self, module: torch.nn.Linear, args: tuple) -> None:
        self.total += args[0].numel() // module.in_features * module.in_features * module.out_features

    def __enter__(self) -> "BlockComputeCounter":
        self.total = 0
        self.handles = [m.register_forward_pre_hook(self._count) for m in self.linears]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def sample_key(method: str, setting: str) -> str:
    return f"{method} {setting}"


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _generate(pipe, setting: Setting, work: Workload, prompts: list[str], seeds: list[int]) -> np.ndarray:
    clips = []
    for i in range(0, len(prompts), work.batch_size):
        if setting.before_generation:
            setting.before_generation(pipe)
        clips.append(pipe(prompts[i : i + work.batch_size], num_inference_steps=setting.steps or work.steps,
                          guidance_scale=work.guidance, num_frames=work.frames, seed=seeds[i : i + work.batch_size],
                          batch_cfg=setting.batch_cfg).frames)
    return np.concatenate(clips)


def measure(pipe, setting: Setting, work: Workload, repeats: int, device: str) -> dict:
    """Clips of every prompt, block multiply-adds, median seconds per timing batch and peak memory for one setting."""
    cuda = str(device).startswith("cuda")
    if setting.enable:
        setting.enable(pipe)
    try:
        with BlockComputeCounter(pipe.transformer) as counter:
            clips = _generate(pipe, setting, work, work.prompts, work.seeds)
        library_fraction = setting.compute_fraction(pipe) if setting.compute_fraction else None
        batch = slice(0, work.batch_size)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            _generate(pipe, setting, work, work.prompts[batch], work.seeds[batch])
            _sync(device)
            seconds.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    finally:
        if setting.disable:
            setting.disable(pipe)
    return {"clips": clips, "block_macs": counter.total, "library_compute_fraction": library_fraction,
            "seconds": statistics.median(seconds), "seconds_all": seconds, "peak_memory_gib": peak}


def run_bench(model: str = "shapes-t2v", device: str = "cpu", steps: int | None = None, guidance: float | None = None,
              prompts: list[str] | None = None, captions: int = 8, seeds: list[int] | tuple[int, ...] = (0,),
              methods: list[str] | None = None, frames: int | None = None, batch_size: int = 8, repeats: int = 3,
              sample_clips: int = 2) -> dict:
    """Run full compute and every selected method; return the results (rows, settings, sample clips).

    Everything is checked before any sampling: model, captions, methods, sizes. A setting
    that fails, or a peer that is not installed, becomes a row saying why; the rest runs on.
    """
    spec = get_spec(model)
    groups = select(methods)
    if repeats < 1 or batch_size < 1 or captions < 1 or sample_clips < 1 or not seeds:
        raise ValueError(f"repeats, batch size, captions and sample clips must be at least 1 and seeds non-empty; got "
                         f"repeats={repeats}, batch_size={batch_size}, captions={captions}, sample_clips={sample_clips}, "
                         f"seeds={list(seeds)}")
    if prompts is not None:
        scenes = [shapesworld.parse_caption(p) for p in prompts]
    else:
        scenes = shapesworld.held_out_scenes(captions, 0, with_motion=spec.is_video)
        prompts = [s.caption(spec.is_video) for s in scenes]
    pipe = load_pipeline(model, device)
    pipe.set_progress_bar_config(disable=True)
    work = Workload(
        prompts=[p for _ in seeds for p in prompts], scenes=[s for _ in seeds for s in scenes],
        seeds=[seed * 1_000_003 + i for seed in seeds for i in range(len(prompts))],
        steps=spec.default_steps if steps is None else steps, guidance=spec.default_guidance if guidance is None else guidance,
        frames=spec.num_frames if frames is None else frames, batch_size=batch_size,
    )
    pipe.check_inputs(work.prompts, work.steps, work.guidance, work.frames, spec.size, spec.size)
    evaluator = load_evaluator(device)
    real_features, _ = read_clips(evaluator, real_clips(work.scenes, work.frames, REAL_SEED_OFFSET))

    full = Setting("full compute", "full compute", {"num_inference_steps": work.steps})
    plan: list[tuple[Group | None, Setting | str]] = [(None, full)]
    for group in groups:
        missing = group.missing()
        if missing:
            plan.append((group, f"not run: {missing}"))
            continue
        try:
            plan += [(group, s) for s in group.build(pipe, work.steps, work.guidance)]
        except Exception as error:  # a peer that cannot be set up on this model: say why, go on
            plan.append((group, f"not run: {type(error).__name__}: {error}"))

    rows, samples, reference = [], {}, None
    for group, setting in tqdm(plan, desc=f"bench {model}", unit="setting"):
        if isinstance(setting, str):
            rows.append({"method": group.key, "family": group.family, "setting": None, "status": setting})
            continue
        key = group.key if group else "full"
        try:
            result = measure(pipe, setting, work, repeats, device)
        except Exception as error:
            if group is None:
                raise
            rows.append({"method": key, "family": setting.family, "setting": setting.name, "settings": setting.settings,
                         "status": f"failed: {type(error).__name__}: {error}",
                         "traceback": traceback.format_exc(limit=4)})
            continue
        reference = reference or result
        features, logits = read_clips(evaluator, result["clips"])
        rows.append({
            "method": key, "family": setting.family, "setting": setting.name,
            "settings": {k: v for k, v in setting.settings.items() if isinstance(v, (int, float, str, bool, list))},
            "status": "ok", "note": setting.note,
            "seconds": result["seconds"], "seconds_all": result["seconds_all"],
            "speedup": reference["seconds"] / result["seconds"],
            "compute_fraction": result["block_macs"] / reference["block_macs"],
            "library_compute_fraction": result["library_compute_fraction"],
            **fidelity(result["clips"], reference["clips"]),
            "semantic_accuracy": semantic_accuracy(logits, work.scenes, spec.is_video),
            # a Gaussian needs two clips at least
            "frechet_distance": frechet_distance(features, real_features) if len(features) > 1 else None,
            "peak_memory_gib": result["peak_memory_gib"],
        })
        samples[sample_key(key, setting.name)] = result["clips"][:sample_clips]
    return {
        "model": model, "device": torch.cuda.get_device_name() if str(device).startswith("cuda")
        else f"cpu ({platform.processor() or platform.machine()})",
        "date": datetime.date.today().isoformat(), "steps": work.steps, "guidance": work.guidance,
        "frames": work.frames, "size": spec.size, "captions": len(prompts), "seeds": list(seeds),
        "batch_size": batch_size, "repeats": repeats, "torch": torch.__version__, "rows": rows, "samples": samples,
    }
