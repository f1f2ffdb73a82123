"""What quantization costs in quality on a shipped model, alone and with Auto step caching (`tempocache quant-quality`).

Every setting loads the model afresh (quantization replaces its weights), draws the same
held-out captions with the same seeds as full precision, and is scored by fidelity to
full precision and semantic accuracy. TimestepAdaptive is paired with static mixed
precision (`per_step=False`), which ranks the layers once by their mean calibrated error:
at a budget static mixed precision reaches a little less than it (a layer is in 8 bits or
not), so TimestepAdaptive also runs at the share static reaches, the comparison at the
same share of 8-bit work.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from .. import quant as q
from .. import step_cache as sc
from ..generation import generate, load_pipeline
from ..quant.quantize import quantizable_linears
from ..reference import shapesworld
from ..reference.models import get_spec
from .cache_quality import quality_cells, run_header, score
from .evaluator import load_evaluator

ADAPTIVE_BUDGETS = (0.9, 0.7)
CACHE_BUDGET = 0.33


def settings(fmt: str, static_shares: dict[float, float], quantized_cache_profile: str | None = None,
             zero_shot: bool = False) -> list[tuple[object | None, object | None]]:
    """(quantization config, step-cache config) pairs; full precision first.

    static_shares: per budget of ADAPTIVE_BUDGETS, the 8-bit share static mixed precision reaches
    at it. With `quantized_cache_profile` (a step-cache profile calibrated on the W8A8 `fmt`
    model, CacheQuant's point), W8A8 `fmt` + Auto also runs with that profile. `zero_shot`: Auto plans
    without the model's profile (which is for its default step count).
    """
    static = [q.W8A8("fp8"), q.W8A8("int8"), q.W8A8(fmt, attention=True)]
    quantized, cached = list(static), [None, *static]
    for budget in ADAPTIVE_BUDGETS:
        adaptive, with_attention = q.TimestepAdaptive(budget, fmt), q.TimestepAdaptive(budget, fmt, attention=True)
        quantized += [adaptive, q.TimestepAdaptive(static_shares[budget], fmt), q.TimestepAdaptive(budget, fmt, per_step=False),
                      with_attention]
        cached += [adaptive, with_attention]
    cached = [(config, sc.Auto(CACHE_BUDGET, zero_shot=zero_shot)) for config in cached]
    if quantized_cache_profile:
        cached.append((q.W8A8(fmt), sc.Auto(CACHE_BUDGET, profile=quantized_cache_profile)))
    return [(None, None), *((config, None) for config in quantized), *cached]


def describe(config) -> str:
    if config is None:
        return "full precision"
    attention = " + FP8 attention" if config.attention else ""
    if isinstance(config, q.W8A8):
        return f"W8A8 {config.format}{attention}"
    kind = "TimestepAdaptive" if config.per_step else "static mixed"
    return f"{kind} {config.format} budget={config.budget:.4g}{attention}"


def quant_quality(model: str = "shapes-t2v", captions: int = 16, device: str = "cpu", batch_size: int = 16,
                  seed: int = 0, fmt: str = "fp8", quantized_cache_profile: str | None = None,
                  steps: int | None = None) -> dict:
    spec = get_spec(model)
    evaluator = load_evaluator(device)
    scenes = shapesworld.held_out_scenes(captions, seed, with_motion=spec.is_video)
    prompts = [s.caption(spec.is_video) for s in scenes]
    probe = load_pipeline(model, device)  # fail on a missing profile before any sampling
    names = [n for n, _ in quantizable_linears(probe.transformer)]
    profile = q.TimestepAdaptive(format=fmt).prepare(probe.transformer, fmt, names).profile
    shares = {budget: profile.static_share(budget) for budget in ADAPTIVE_BUDGETS}
    runs = settings(fmt, shares, quantized_cache_profile, zero_shot=steps not in (None, spec.default_steps))
    for quant_config, cache_config in runs:
        if isinstance(quant_config, q.TimestepAdaptive):
            quant_config.prepare(probe.transformer, fmt, names)
        if cache_config is not None:
            cache_config.make_policy(probe.transformer)
    del probe

    rows, reference = [], None
    for quant_config, cache_config in tqdm(runs, desc=f"{model} quantization quality"):
        pipe = load_pipeline(model, device)
        state = q.quantize(pipe, quant_config) if quant_config is not None else None
        if cache_config is not None:
            sc.enable(pipe, cache_config)
        start = time.perf_counter()
        clips = generate(prompts, steps=steps, seed=seed, device=device, batch_size=batch_size, pipe=pipe)
        seconds = time.perf_counter() - start
        reference = clips if reference is None else reference
        stats = state.stats() if state is not None else {}
        rows.append({
            "quantization": describe(quant_config),
            "step_cache": "none" if cache_config is None else f"Auto(budget={cache_config.budget})"
                          + (" profiled quantized" if cache_config.profile is not None else "")
                          + (" zero-shot" if cache_config.zero_shot else ""),
            "low_precision_share": stats.get("low_precision_share", 0.0),
            "weight_bytes_ratio": stats["weight_bytes_before"] / stats["weight_bytes_after"] if stats else 1.0,
            "compute_fraction": sc.stats(pipe)["compute_fraction"] if cache_config is not None else 1.0,
            **score(clips, reference, evaluator, scenes, spec.is_video),
            "seconds": round(seconds, 2),
        })
    steps = spec.default_steps if steps is None else steps
    return {**run_header(model, captions, seed, steps, spec.default_guidance, device), "format": fmt, "rows": rows}


def format_table(result: dict) -> str:
    lines = ["| quantization | step cache | 8-bit share | weights smaller | block compute | PSNR (dB) | SSIM | rel. L2 | colour | shape | motion | all |",
             "|---" * 12 + "|"]
    for r in result["rows"]:
        lines.append(f"| {r['quantization']} | {r['step_cache']} | {r['low_precision_share']:.2f} | {r['weight_bytes_ratio']:.2f}x | "
                     f"{r['compute_fraction']:.2f} | {quality_cells(r)}")
    return "\n".join(lines)
