"""What `tempocache bench` can run: full compute, fewer steps, our policies and the peers'.

Each method is a group of settings. A setting knows how to switch itself on and off on
a pipeline; everything else (sampling, timing, scoring) is the runner's, identical for
all. Peers are optional: a group whose library is missing says so instead of failing.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib.util
import io
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from .. import quant
from .. import step_cache as sc
from ..region import RegionE, fit_gamma
from ..eval.cache_quality import SETTINGS
from ..models import REGION, attached, find_blocks
from ..quant.quantize import quantizable_linears
from ..reference import edits, shapesworld
from ..reference.pipeline import ShapesPipeline
from ..step_cache.planner import BUDGETS as AUTO_BUDGETS

FAMILIES = ("full compute", "fewer steps", "tempocache", "diffusers", "cache-dit", "torchao")
FEWER_STEPS = (0.7, 0.5, 0.33, 0.25)  # fractions of the full step count


@dataclass
class Setting:
    name: str  # e.g. "Auto(budget=0.33)"
    family: str
    settings: dict
    enable: Callable[[ShapesPipeline], None] | None = None
    disable: Callable[[ShapesPipeline], None] | None = None
    before_generation: Callable[[ShapesPipeline], None] | None = None  # peers that need an explicit reset
    steps: int | None = None  # None: the bench's step count
    batch_cfg: bool = False  # both CFG branches in one call (FasterCache and PAB expect it)
    compute_fraction: Callable[[ShapesPipeline], float] | None = None  # the library's own count, where it gives one
    partitions: Callable[[ShapesPipeline], list[torch.Tensor]] | None = None  # RegionE's edited tokens, per generation
    note: str = ""


@dataclass
class Group:
    key: str  # what --methods takes, e.g. "tempocache.Auto", "diffusers.MagCache"
    family: str
    requires: str | None = None  # importable module the group needs
    build: Callable[[ShapesPipeline, int, float], list[Setting]] = field(default=lambda pipe, steps, guidance: [])

    def missing(self) -> str | None:
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return f"{self.requires} is not installed (pip install 'tempocache[peers]')"
        return None


def _label(kind: str, settings: dict) -> str:
    return f"{kind}(" + ", ".join(f"{k}={v}" for k, v in settings.items()) + ")"


# --- ours --------------------------------------------------------------------------------------------------


def _tempocache_group(policy: str) -> Group:
    makers = [partial(sc.Auto, budget=b) for b in AUTO_BUDGETS] if policy == "Auto" else SETTINGS[policy]

    def build(pipe: ShapesPipeline, steps: int, guidance: float) -> list[Setting | str]:
        out = []
        for make in makers:
            config = make()
            settings = {k: v for k, v in vars(config).items() if k != "profile" and v is not None}
            label = _label(policy, {k: settings[k] for k in make.keywords})
            try:  # what would fail at every generation is said now, before any sampling
                sc.check_config(pipe, config, steps)
            except ValueError as error:
                out.append(f"not run: {label}: {error}")
                continue
            out.append(Setting(
                label, "tempocache", settings,
                enable=partial(sc.enable, config=config), disable=sc.disable,
                compute_fraction=lambda p: sc.stats(p)["compute_fraction"],
            ))
        return out

    return Group(f"tempocache.{policy}", "tempocache", build=build)


# Quantization replaces weights for good: each setting runs on a copy of the transformer, dropped afterwards.
QUANTIZED = {
    "W8A8": [(quant.W8A8("fp8"), None), (quant.W8A8("int8"), None), (quant.W8A8("fp8", attention=True), None)],
    "TimestepAdaptive": [(quant.TimestepAdaptive(b, "fp8"), None) for b in (0.9, 0.7)],
    "W8A8+Auto": [(quant.W8A8("fp8"), 0.33), (quant.W8A8("int8"), 0.33), (quant.W8A8("fp8", attention=True), 0.33),
                  (quant.TimestepAdaptive(0.7, "fp8"), 0.33)],
}


def _on_a_copy(apply: Callable[[torch.nn.Module], None]) -> tuple[Callable, Callable]:
    def enable(pipe: ShapesPipeline) -> None:
        pipe._bench_original_transformer = pipe.transformer
        pipe.transformer = copy.deepcopy(pipe.transformer)
        apply(pipe.transformer)

    def disable(pipe: ShapesPipeline) -> None:
        pipe.transformer = pipe.__dict__.pop("_bench_original_transformer")

    return enable, disable


def _quantized_group(kind: str) -> Group:
    def build(pipe: ShapesPipeline, steps: int, guidance: float) -> list[Setting]:
        out = []
        for config, budget in QUANTIZED[kind]:
            settings = {k: v for k, v in vars(config).items() if k != "profile" and (k != "attention" or v)}
            if budget is not None:
                settings["cache"] = f"Auto(budget={budget})"

            def apply(transformer, config=config, budget=budget):
                quant.quantize(transformer, config)
                if budget is not None:
                    sc.enable(transformer, sc.Auto(budget))

            enable, disable = _on_a_copy(apply)
            out.append(Setting(_label(type(config).__name__, settings), "tempocache", settings, enable=enable, disable=disable,
                               compute_fraction=(lambda p: sc.stats(p)["compute_fraction"]) if budget is not None else None))
        return out
    return Group(f"tempocache.{kind}", "tempocache", build=build)


def _torchao(kind: str) -> Callable:
    def build(pipe: ShapesPipeline, steps: int, guidance: float) -> list[Setting]:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
            PerTensor,
            quantize_,
        )

        device = pipe.transformer.device
        settings = {}
        if kind == "float8":
            if not (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)):
                raise ValueError("torchao's float8 runs only on a GPU of compute capability 8.9+ (tempocache's FP8 is simulated elsewhere)")
            # torchao's row-wise float8 (the scheme closest to ours) takes only bf16 weights
            bf16 = next(pipe.transformer.parameters()).dtype == torch.bfloat16
            settings["granularity"] = "PerRow" if bf16 else "PerTensor"
            config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow() if bf16 else PerTensor())
        else:
            config = Int8DynamicActivationInt8WeightConfig()

        def apply(transformer):
            names = {name for name, _ in quantizable_linears(transformer)}  # the same layers as ours
            quantize_(transformer, config, filter_fn=lambda module, fqn: fqn in names)

        enable, disable = _on_a_copy(apply)
        config_name = type(config).__name__
        return [Setting(_label(config_name, settings) if settings else config_name, "torchao", {"config": config_name, **settings},
                        enable=enable, disable=disable, note="the linears tempocache quantizes (inside the blocks, modulation excluded)")]
    return build


def _fewer_steps(pipe: ShapesPipeline, steps: int, guidance: float) -> list[Setting]:
    counts = sorted({max(1, round(steps * f)) for f in FEWER_STEPS} - {steps}, reverse=True)
    return [Setting(f"{n} steps", "fewer steps", {"num_inference_steps": n}, steps=n, compute_fraction=lambda p, n=n: n / steps)
            for n in counts]


# --- diffusers 0.42.1's cache hooks -------------------------------------------------------------------------


def _diffusers(kind: str, make_config: Callable[..., Any], grid: list[dict], batch_cfg: bool = False, note: str = "",
               fixed: Callable[[ShapesPipeline, int, float], dict] = lambda pipe, steps, guidance: {}) -> Callable:
    def build(pipe: ShapesPipeline, steps: int, guidance: float) -> list[Setting]:
        extra = fixed(pipe, steps, guidance)
        return [Setting(
            _label(kind, knobs), "diffusers", {**knobs, **{k: v for k, v in extra.items() if not callable(v)}},
            enable=lambda p, knobs=knobs: p.transformer.enable_cache(make_config(**knobs, **extra)),
            disable=lambda p: p.transformer.disable_cache(), batch_cfg=batch_cfg, note=note,
        ) for knobs in grid]
    return build


def _timestep_callback(pipe: ShapesPipeline, steps: int, guidance: float) -> dict:
    return {"current_timestep_callback": lambda: float(pipe.current_timestep)}


def _mag_ratios(pipe: ShapesPipeline, steps: int, guidance: float, prompts: int = 4) -> dict:
    """MagCache's per-step residual magnitude ratios for this model, by its own calibration mode on training captions.

    diffusers prints them at the end of a calibration run; that printout is the documented
    way to get them ("copy the printed ratios"), so it is read back here.
    """
    from diffusers import MagCacheConfig

    captions, inputs = calibration_inputs(pipe, prompts)
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            pipe(captions, num_inference_steps=steps, guidance_scale=guidance, seed=0, **inputs)
    finally:
        pipe.transformer.disable_cache()
    lists = [ast.literal_eval(line) for line in printed.getvalue().splitlines() if line.startswith("[") and not line.startswith("[Mag")]
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios")
    ratios = [sum(r) / len(r) for r in zip(*lists)]  # one list per CFG branch: average them
    return {"num_inference_steps": steps, "mag_ratios": [round(r, 4) for r in ratios]}


def calibration_inputs(pipe: ShapesPipeline, count: int) -> tuple[list[str], dict]:
    """Training prompts for a calibration run, and for an editor the images they edit."""
    rng = np.random.default_rng(0)
    if pipe.spec.task == "edit":
        batch = edits.sample_edit_batch(rng, count, "train", pipe.spec.size)
        return batch.instructions(), {"image": batch.sources}
    video = pipe.spec.is_video
    return [shapesworld.sample_scene(rng, "train", video).caption(video) for _ in range(count)], {}


# --- RegionE (ours, on an editor) -----------------------------------------------------------------------------

# the velocity cache's settings take the gamma fitted on training edits (`fit_gamma`) at this step count
SHORT = {"partition_step": 3, "refresh_steps": (), "final_steps": 1}  # fewer full steps than RegionE's schedule
REGION_SETTINGS = ({}, {"threshold": 0.9}, SHORT, {**SHORT, "partition_step": 2},
                   {**SHORT, "velocity_threshold": 0.05}, {**SHORT, "partition_step": 2, "velocity_threshold": 0.1})


def _region(pipe: ShapesPipeline, steps: int, guidance: float) -> list[Setting]:
    if pipe.spec.task != "edit":
        raise ValueError(f"RegionE accelerates an editor; {pipe.spec.name} has no image in context")
    gamma = fit_gamma(pipe, steps=steps) if any("velocity_threshold" in k for k in REGION_SETTINGS) else None
    out = []
    for knobs in REGION_SETTINGS:
        config = RegionE.for_steps(steps, **knobs, **({"gamma": gamma} if "velocity_threshold" in knobs else {}))
        config.check(steps)
        settings = {k: [round(g, 4) for g in v] if k == "gamma" else list(v) if isinstance(v, tuple) else v
                    for k, v in vars(config).items() if v is not None}
        out.append(Setting(_label("RegionE", knobs) if knobs else "RegionE()", "tempocache", settings,
                           enable=partial(sc.enable, config=config), disable=sc.disable,
                           compute_fraction=lambda p: sc.stats(p)["compute_fraction"],
                           partitions=lambda p: attached(p, REGION).partitions))
    return out


def _diffusers_groups() -> list[Group]:
    from diffusers import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    def taylorseer(**knobs):
        return TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32, **knobs)

    def attention_modules(pipe: ShapesPipeline, steps: int, guidance: float) -> dict:
        # TaylorSeerCache's default patterns fullmatch modules named "...attn" (FLUX); Wan names them attn1/attn2,
        # which the defaults miss, so name every attention module of the model explicitly.
        inside = {id(m) for block in find_blocks(pipe.transformer).modules for m in block.modules()}
        names = [n for n, m in pipe.transformer.named_modules() if id(m) in inside and re.fullmatch(r"attn\d*", n.rsplit(".", 1)[-1])]
        return {"cache_identifiers": [re.escape(n) for n in names]}

    def faster_cache_fixed(pipe: ShapesPipeline, steps: int, guidance: float) -> dict:
        video = pipe.spec.is_video
        # FasterCache approximates the unconditional branch by a 2-D FFT of the model output over its last two
        # axes; a token sequence (B, N, C), as FLUX returns, has no such axes, so there it reuses attention only.
        return {**_timestep_callback(pipe, steps, guidance), "tensor_format": "BCFHW", "is_guidance_distilled": not video}

    return [
        Group("diffusers.FirstBlockCache", "diffusers", build=_diffusers(
            "FirstBlockCache", FirstBlockCacheConfig, [{"threshold": t} for t in (0.1, 0.2, 0.4, 0.8)])),
        Group("diffusers.TaylorSeerCache", "diffusers", build=_diffusers(
            "TaylorSeerCache", taylorseer, [{"cache_interval": i, "max_order": o} for i, o in ((2, 1), (3, 1), (4, 2), (6, 1))],
            fixed=attention_modules, note="forecasts every attention module's output")),
        Group("diffusers.TaylorSeerCache-lite", "diffusers", build=_diffusers(
            "TaylorSeerCache", taylorseer, [{"cache_interval": i, "max_order": o, "use_lite_mode": True}
                                            for i, o in ((2, 1), (3, 1), (4, 2), (6, 1))],
            note="lite mode: skips the blocks, forecasts the output projection")),
        Group("diffusers.MagCache", "diffusers", build=_diffusers(
            "MagCache", MagCacheConfig, [{"threshold": t} for t in (0.06, 0.12, 0.24, 0.5)], fixed=_mag_ratios,
            note="mag_ratios measured by MagCache's own calibration run on this model")),
        Group("diffusers.PyramidAttentionBroadcast", "diffusers", build=_diffusers(
            "PyramidAttentionBroadcast", PyramidAttentionBroadcastConfig,
            [{"spatial_attention_block_skip_range": s, "cross_attention_block_skip_range": 2 * s} for s in (2, 3, 4)],
            batch_cfg=True, fixed=_timestep_callback,
            note="one state per attention layer, not per CFG branch: run with both branches in one call")),
        Group("diffusers.FasterCache", "diffusers", build=_diffusers(
            "FasterCache", FasterCacheConfig, [{"spatial_attention_block_skip_range": s} for s in (2, 3, 4)],
            batch_cfg=True, fixed=faster_cache_fixed,
            note="needs both CFG branches in one call; on FLUX (token outputs) attention reuse only")),
    ]


# --- cache-dit 1.5.3 ----------------------------------------------------------------------------------------


def _cache_dit(kind: str, fn: int, taylorseer: bool) -> Callable:
    def build(pipe: ShapesPipeline, steps: int, guidance: float) -> list[Setting]:
        import cache_dit

        blocks = len(find_blocks(pipe.transformer))
        if fn >= blocks:
            raise ValueError(f"F{fn} computes the first {fn} blocks every step; {pipe.spec.name} has {blocks}, "
                             f"so nothing is left to cache")
        warmup = max(1, round(0.2 * steps))  # cache-dit's 8 warm-up steps are meant for 28-50 step schedules
        out = []
        for threshold in (0.08, 0.16, 0.32, 0.64, 1.0):
            knobs = {"Fn_compute_blocks": fn, "Bn_compute_blocks": 0, "residual_diff_threshold": threshold,
                     "max_warmup_steps": warmup}
            if taylorseer:
                knobs["taylorseer_order"] = 1

            def enable(p: ShapesPipeline, knobs=knobs) -> None:
                cache = {k: v for k, v in knobs.items() if k != "taylorseer_order"}
                calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
                cache_dit.enable_cache(p.transformer, cache_config=cache_dit.DBCacheConfig(
                    **cache, num_inference_steps=steps, enable_separate_cfg=True), calibrator_config=calibrator)

            out.append(Setting(
                _label(kind, {"F": fn, "B": 0, "threshold": threshold}), "cache-dit", knobs, enable=enable,
                disable=lambda p: cache_dit.disable_cache(p.transformer),
                # cache-dit keeps buffers from one generation into the next unless its context is refreshed
                before_generation=lambda p: cache_dit.refresh_context(p.transformer, num_inference_steps=steps),
            ))
        return out
    return build


def groups() -> list[Group]:
    """Every group the bench knows, in report order."""
    out = [Group("fewer-steps", "fewer steps", build=_fewer_steps), Group("tempocache.RegionE", "tempocache", build=_region)]
    out += [_tempocache_group(policy) for policy in SETTINGS]
    out += [_quantized_group(kind) for kind in QUANTIZED]
    out += _diffusers_groups()
    out += [
        Group("cache-dit.DBCache-F1B0", "cache-dit", "cache_dit", _cache_dit("DBCache", 1, False)),
        Group("cache-dit.DBCache-F8B0", "cache-dit", "cache_dit", _cache_dit("DBCache", 8, False)),
        Group("cache-dit.DBCache+TaylorSeer", "cache-dit", "cache_dit", _cache_dit("DBCache+TaylorSeer", 1, True)),
        Group("torchao.Float8DynamicActivation", "torchao", "torchao", _torchao("float8")),
        Group("torchao.Int8DynamicActivation", "torchao", "torchao", _torchao("int8")),
    ]
    return out


def select(names: list[str] | None) -> list[Group]:
    """Groups by key or by family name (`tempocache`, `diffusers`, `cache-dit`, `fewer-steps`); None: all."""
    known = groups()
    if not names:
        return known
    by_family = {g.family.replace(" ", "-"): g.family for g in known}
    unknown = [n for n in names if n not in by_family and n not in {g.key for g in known}]
    if unknown:
        raise ValueError(f"unknown method {', '.join(map(repr, unknown))}; known: {', '.join(by_family)} "
                         f"(whole families) or any of: {', '.join(g.key for g in known)}")
    families = {by_family[n] for n in names if n in by_family}
    return [g for g in known if g.family in families or g.key in names]
