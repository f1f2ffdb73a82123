"""What each step-cache policy costs in quality on a shipped model (`tempocache cache-quality`).

Full compute and every policy setting draw the same held-out captions with the same
seeds; each setting is scored by its fraction of block compute, fidelity to full
compute (PSNR, SSIM, relative L2) and semantic accuracy.
"""

from __future__ import annotations

import datetime
import time
from functools import partial
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import step_cache as sc
from ..generation import generate, load_pipeline
from ..reference import shapesworld
from ..reference.models import get_spec
from ..step_cache.policy import check_int
from .evaluator import load_evaluator
from .fidelity import fidelity
from .metrics import read_clips, semantic_accuracy

# Each policy at settings spanning roughly the same range of compute (about 0.25 to 0.8).
SETTINGS: dict[str, list[Callable[[], object]]] = {
    "StaticCache": [partial(sc.StaticCache, interval=i) for i in (2, 3, 4, 5)],
    "DeltaDiT": [partial(sc.DeltaDiT, interval=i) for i in (2, 4, 8)],
    "FirstBlockCache": [partial(sc.FirstBlockCache, threshold=t) for t in (0.1, 0.2, 0.4, 0.8)],
    "DBCache": [partial(sc.DBCache, fn=2, bn=1, threshold=t) for t in (0.1, 0.2, 0.4, 0.8)],
    "TeaCache": [partial(sc.TeaCache, threshold=t) for t in (0.1, 0.3, 0.6)],
    "TaylorSeer": [partial(sc.TaylorSeer, order=o, interval=i) for o, i in ((1, 2), (1, 3), (1, 4), (2, 3))],
    "GatedTaylorSeer": [partial(sc.GatedTaylorSeer, threshold=t, max_interval=6) for t in (0.1, 0.2, 0.4)],
    "ERTACache": [partial(sc.ERTACache, budget=b) for b in (0.5, 0.33, 0.25)],
    "TemporalDeltaCache": [partial(sc.TemporalDeltaCache, threshold=t) for t in (0.1, 0.2, 0.3)],
    "CFGReuse": [partial(sc.CFGReuse, interval=i) for i in (2, 4, 8)],
    "Auto": [partial(sc.Auto, budget=b) for b in (0.5, 0.33, 0.25)],
    "Auto-zero-shot": [partial(sc.Auto, budget=b, zero_shot=True) for b in (0.5, 0.33, 0.25)],  # no profile of this model
}


def cache_quality(model: str = "shapes-t2v", captions: int = 16, steps: int | None = None, guidance: float | None = None,
                  device: str = "cpu", batch_size: int = 16, seed: int = 0, policies: list[str] | None = None) -> dict:
    spec = get_spec(model)
    check_int("captions", captions, 1)
    check_int("batch_size", batch_size, 1)
    unknown = set(policies or []) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown policies {sorted(unknown)}; known: {', '.join(SETTINGS)}")
    pipe = load_pipeline(model, device)
    evaluator = load_evaluator(device)
    scenes = shapesworld.held_out_scenes(captions, seed, with_motion=spec.is_video)
    prompts = [s.caption(spec.is_video) for s in scenes]
    configs = [(name, make()) for name in (policies or SETTINGS) for make in SETTINGS[name]]
    for _, config in configs:  # fail on a missing profile before any sampling
        config.make_policy(pipe.transformer)

    def run(config) -> dict:
        if config is not None:
            sc.enable(pipe, config)
        try:
            start = time.perf_counter()
            clips = generate(prompts, steps=steps, guidance=guidance, seed=seed, device=device, batch_size=batch_size, pipe=pipe)
            seconds = time.perf_counter() - start
            stats = sc.stats(pipe) if config is not None else {"compute_fraction": 1.0}
        finally:
            if config is not None:
                sc.disable(pipe)
        return {"clips": clips, "seconds": seconds, "compute_fraction": stats["compute_fraction"]}

    reference = run(None)
    rows = []
    for name, config in tqdm([("full compute", None), *configs], desc=f"{model} cache quality"):
        result = reference if config is None else run(config)
        rows.append({
            "policy": name,
            "settings": {} if config is None else {k: v for k, v in vars(config).items() if k != "profile" and v is not None},
            "compute_fraction": result["compute_fraction"],
            **score(result["clips"], reference["clips"], evaluator, scenes, spec.is_video),
            "seconds": round(result["seconds"], 2),
        })
    return {**run_header(model, captions, seed, spec.default_steps if steps is None else steps,
                         spec.default_guidance if guidance is None else guidance, device),
            "rows": rows}


def score(clips: np.ndarray, reference: np.ndarray, evaluator, scenes: list, is_video: bool) -> dict:
    """Fidelity to the reference clips (PSNR, SSIM, relative L2) and semantic accuracy against the scenes."""
    return {**fidelity(clips, reference),
            "semantic_accuracy": semantic_accuracy(read_clips(evaluator, clips)[1], scenes, is_video)}


def run_header(model: str, captions: int, seed: int, steps: int, guidance: float, device: str) -> dict:
    return {"model": model, "captions": captions, "seed": seed, "steps": steps, "guidance": guidance,
            "device": torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu",
            "date": datetime.date.today().isoformat()}


def quality_cells(row: dict) -> str:
    """PSNR, SSIM, relative L2 and the semantic accuracies of a scored row, as markdown table cells."""
    acc = row["semantic_accuracy"]
    return (f"{row['psnr']:.2f} | {row['ssim']:.3f} | {row['relative_l2']:.3f} | {acc['colour']:.2f} | {acc['shape']:.2f} | "
            f"{acc.get('motion', float('nan')):.2f} | {acc['all']:.2f} |")


def frontier_psnr(points: list[tuple[float, float]], compute: float) -> float | None:
    """The best PSNR a method's settings (compute, PSNR) reach at `compute`: their frontier (the best PSNR at no more
    compute), linearly interpolated; None if even its cheapest setting spends more."""
    points = sorted(points)
    frontier = [(x, max(y for x2, y in points if x2 <= x)) for x, _ in points]
    if compute < frontier[0][0] - 1e-9:
        return None
    return float(np.interp(compute, [x for x, _ in frontier], [y for _, y in frontier]))


def auto_comparison(result: dict) -> dict[str, list[str]]:
    """Auto against every other policy at Auto's own compute.

    A policy's PSNR at that compute is read off its settings' frontier (the best PSNR at
    each compute, linearly interpolated). `losses`: policies at least as faithful there;
    `out_of_reach`: policies whose cheapest setting spends more than Auto did.
    """
    rows = [r for r in result["rows"] if r["policy"] != "full compute"]
    losses, out_of_reach = [], []
    for auto in (r for r in rows if r["policy"] == "Auto"):
        c = auto["compute_fraction"]
        for policy in sorted({r["policy"] for r in rows} - {"Auto"}):
            points = [(r["compute_fraction"], r["psnr"]) for r in rows if r["policy"] == policy]
            rival = frontier_psnr(points, c)
            if rival is None:
                cheapest = min(points)
                out_of_reach.append(f"{policy} (cheapest setting {cheapest[0]:.2f} compute, {cheapest[1]:.2f} dB) "
                                    f"vs Auto budget {auto['settings']['budget']} ({c:.2f}, {auto['psnr']:.2f} dB)")
                continue
            if rival >= auto["psnr"]:
                losses.append(f"{policy} at {c:.2f} compute: {rival:.2f} dB >= Auto budget {auto['settings']['budget']} {auto['psnr']:.2f} dB")
    return {"losses": losses, "out_of_reach": out_of_reach}


def format_table(result: dict) -> str:
    lines = ["| policy | settings | compute | PSNR (dB) | SSIM | rel. L2 | colour | shape | motion | all |", "|---" * 10 + "|"]
    for r in result["rows"]:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
        lines.append(f"| {r['policy']} | {settings} | {r['compute_fraction']:.2f} | {quality_cells(r)}")
    return "\n".join(lines)


def format_frontier(result: dict, caps: tuple[float, ...] = (0.25, 0.33, 0.5, 0.7)) -> str:
    """Per policy and compute cap: its best PSNR among settings spending at most that much, with the compute spent."""
    lines = ["| policy | " + " | ".join(f"compute <= {c}" for c in caps) + " |", "|---" * (len(caps) + 1) + "|"]
    policies = dict.fromkeys(r["policy"] for r in result["rows"] if r["policy"] != "full compute")
    for policy in policies:
        cells = []
        for cap in caps:
            fits = [r for r in result["rows"] if r["policy"] == policy and r["compute_fraction"] <= cap + 1e-9]
            best = max(fits, key=lambda r: r["psnr"], default=None)
            cells.append(f"{best['psnr']:.1f} ({best['compute_fraction']:.2f})" if best else "-")
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
