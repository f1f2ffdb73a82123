"""`tempocache bench`: every method on the same model, captions and seeds, in one process.

For each setting: one pass over all captions x seeds (its clips are scored; it also warms
the method up), then `repeats` timed passes over the first `timed_batches` batches, whose median is the
wall-clock; speedups are against full compute timed the same way in the same run. Block
compute is counted the same way for every method: the multiply-adds of the linear layers
inside the transformer blocks that actually ran, against full compute's. On an editor the
workload is held-out ShapesWorld edits (the image and its instruction), scored by the edit judge
(per kind) instead of semantic accuracy and Fréchet distance; RegionE's partitions are scored
against the ground-truth masks.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..eval.edit_quality import in_group, judge_edits, partition_scores, summarize_edits
from ..eval.evaluator import load_evaluator
from ..eval.fidelity import fidelity
from ..eval.metrics import frechet_distance, read_clips, semantic_accuracy
from ..eval.reference_eval import REAL_SEED_OFFSET, real_clips
from ..generation import load_pipeline
from ..models import find_blocks
from ..quant.linear import QuantLinear
from ..reference import edits as shapes_edits
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
    timed_batches: int = 1
    images: torch.Tensor | None = None  # an editor's: the images edited (N, 3, H, W), one per prompt
    edits: list[shapes_edits.Edit] | None = None


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


def _generate(pipe, setting: Setting, work: Workload, count: int) -> np.ndarray:
    """Clips of the first `count` prompts."""
    clips = []
    for i in range(0, count, work.batch_size):
        batch = slice(i, min(i + work.batch_size, count))
        if setting.before_generation:
            setting.before_generation(pipe)
        image = {} if work.images is None else {"image": work.images[batch]}
        clips.append(pipe(work.prompts[batch], num_inference_steps=setting.steps or work.steps,
                          guidance_scale=work.guidance, num_frames=work.frames, seed=work.seeds[batch],
                          batch_cfg=setting.batch_cfg, **image).frames)
    return np.concatenate(clips)


def measure(pipe, setting: Setting, work: Workload, repeats: int, device: str) -> dict:
    """Clips of every prompt, block multiply-adds, median seconds per timing batch and peak memory for one setting."""
    cuda = str(device).startswith("cuda")
    if setting.enable:
        setting.enable(pipe)
    try:
        with BlockComputeCounter(pipe.transformer) as counter:
            clips = _generate(pipe, setting, work, len(work.prompts))
        library_fraction = setting.compute_fraction(pipe) if setting.compute_fraction else None
        partitions = torch.cat(setting.partitions(pipe)) if setting.partitions else None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            _generate(pipe, setting, work, min(work.batch_size * work.timed_batches, len(work.prompts)))
            _sync(device)
            seconds.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    finally:
        if setting.disable:
            setting.disable(pipe)
    return {"clips": clips, "block_macs": counter.total, "library_compute_fraction": library_fraction,
            "seconds": statistics.median(seconds), "seconds_all": seconds, "peak_memory_gib": peak,
            "partitions": partitions}


def run_bench(model: str = "shapes-t2v", device: str = "cpu", steps: int | None = None, guidance: float | None = None,
              prompts: list[str] | None = None, captions: int = 8, seeds: list[int] | tuple[int, ...] = (0,),
              methods: list[str] | None = None, frames: int | None = None, batch_size: int = 8, repeats: int = 3,
              sample_clips: int = 2, edit_kinds: tuple[str, ...] = shapes_edits.KINDS, timed_batches: int = 1,
              progress: Callable[[dict], None] | None = None) -> dict:
    """Run full compute and every selected method; return the results (rows, settings, sample clips).
    On an editor, `captions` held-out edits of `edit_kinds` (in turn) are the workload. `progress` is given the
    results so far after every row (a long run cut short then keeps what it finished).

    Everything is checked before any sampling: model, captions, methods, sizes. A setting
    that fails, or a peer that is not installed, becomes a row saying why; the rest runs on.
    """
    spec = get_spec(model)
    groups = select(methods)
    if repeats < 1 or batch_size < 1 or captions < 1 or sample_clips < 1 or timed_batches < 1 or not seeds:
        raise ValueError(f"repeats, batch size, captions, sample clips and timed batches must be at least 1 and seeds "
                         f"non-empty; got "
                         f"repeats={repeats}, batch_size={batch_size}, captions={captions}, sample_clips={sample_clips}, "
                         f"timed_batches={timed_batches}, "
                         f"seeds={list(seeds)}")
    listed, images = None, None
    if spec.task == "edit":
        if prompts is not None:
            raise ValueError("an editor's bench runs on held-out edits (give --captions and --edit-kinds), not prompts")
        listed = shapes_edits.held_out_edits(captions, kinds=tuple(edit_kinds))
        images = torch.stack([shapes_edits.render_edit(e)[0] for e in listed])
        scenes, prompts = [e.target for e in listed], [e.instruction for e in listed]
    elif prompts is not None:
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
        frames=spec.num_frames if frames is None else frames, batch_size=batch_size, timed_batches=timed_batches,
        images=None if images is None else images.repeat(len(seeds), 1, 1, 1),
        edits=None if listed is None else listed * len(seeds),
    )
    pipe.check_inputs(work.prompts, work.steps, work.guidance, work.frames, spec.size, spec.size, work.images)
    evaluator = load_evaluator(device)
    real_features = None if work.edits else read_clips(evaluator, real_clips(work.scenes, work.frames, REAL_SEED_OFFSET))[0]

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

    def results(rows: list[dict], samples: dict) -> dict:
        return {
            **({"edits": len(listed), "edit_kinds": list(edit_kinds)} if listed else {}),
            "model": model, "device": torch.cuda.get_device_name() if str(device).startswith("cuda")
            else f"cpu ({platform.processor() or platform.machine()})",
            "date": datetime.date.today().isoformat(), "steps": work.steps, "guidance": work.guidance,
            "frames": work.frames, "size": spec.size, "captions": len(prompts), "seeds": list(seeds),
            "batch_size": batch_size, "timed_batches": timed_batches, "repeats": repeats, "torch": torch.__version__,
            "rows": rows, "samples": samples,
        }

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
        rows.append({
            "method": key, "family": setting.family, "setting": setting.name,
            "settings": {k: v for k, v in setting.settings.items() if isinstance(v, (int, float, str, bool, list))},
            "status": "ok", "note": setting.note,
            "seconds": result["seconds"], "seconds_all": result["seconds_all"],
            "speedup": reference["seconds"] / result["seconds"],
            "compute_fraction": result["block_macs"] / reference["block_macs"],
            "library_compute_fraction": result["library_compute_fraction"],
            **fidelity(result["clips"], reference["clips"]),
            **_quality(evaluator, result, reference, work, real_features, spec.is_video),
            "peak_memory_gib": result["peak_memory_gib"],
        })
        samples[sample_key(key, setting.name)] = result["clips"][:sample_clips]
        if progress:
            progress(results(rows, samples))
    return results(rows, samples)


def _quality(evaluator, result: dict, reference: dict, work: Workload, real_features, video: bool) -> dict:
    """A generator's semantic accuracy and Fréchet distance; an editor's edit judge per kind, its PSNR against full
    compute per kind, and a partition's recall and IoU against the ground-truth masks and against the pixels the
    full edit changed."""
    clips = result["clips"]
    if work.edits is None:
        features, logits = read_clips(evaluator, clips)
        return {"semantic_accuracy": semantic_accuracy(logits, work.scenes, video),
                # a Gaussian needs two clips at least
                "frechet_distance": frechet_distance(features, real_features) if len(features) > 1 else None}
    images = torch.from_numpy(clips[:, 0]).permute(0, 3, 1, 2)
    judged = judge_edits(evaluator, images, work.edits)
    for row, clip, full in zip(judged, clips, reference["clips"]):
        row["psnr_vs_full"] = fidelity(clip[None], full[None])["psnr"]
    out = {"edit_quality": summarize_edits(judged, work.edits)}
    for name, group in out["edit_quality"].items():
        members = [r for r, e in zip(judged, work.edits) if in_group(e, name)]
        group["psnr_vs_full"] = float(np.mean([r["psnr_vs_full"] for r in members]))
    if result["partitions"] is not None:
        # against the ground truth, and against what the full edit changed (an added object may go anywhere)
        truth = torch.stack([shapes_edits.render_edit(e)[2] for e in work.edits])
        full_edit = (torch.from_numpy(reference["clips"][:, 0]).permute(0, 3, 1, 2) - work.images).abs().amax(1) > 0.1
        for label, masks in (("partition", truth), ("partition_vs_full_edit", full_edit)):
            scores = partition_scores(result["partitions"], masks)
            for name, group in out["edit_quality"].items():
                members = [s for s, e in zip(scores, work.edits) if in_group(e, name)]
                group.update({f"{label}_{k}": float(np.mean([s[k] for s in members])) for k in ("recall", "iou")})
                group[f"{label}_recall_min"] = float(min(s["recall"] for s in members))
                group["edited_fraction"] = float(np.mean([s["edited_fraction"] for s in members]))
    return out
