"""Quantization speed and memory on a Wan2.1-1.3B-shaped transformer (random weights, bf16 baseline).

One process on the GPU, the latent of step_cache_overhead.py (480p x 81 frames, 32,760 tokens):
- the GPU kernels against the simulated numerics, on the model's own layer shapes;
- the block linears alone, per step: bf16, torchao's float8 row-wise dynamic quantization, ours W8A8 FP8;
- whole steps (median of repeats over a short schedule): bf16, torchao FP8, ours W8A8 FP8, ours
  TimestepAdaptive at two budgets (predictor fitted in the run on the bf16 model, 10 steps of a small latent);
- 50 steps end to end: bf16 full compute against ours W8A8 FP8 + Auto(budget=0.33), the cache
  profiled on the quantized model;
- weight memory of the quantized layers (bf16 bytes less what quantizing freed, read from the allocator), peak memory.
Every model is rebuilt from the same seed; warm-up runs are excluded.

    python benchmarks/quant_speed.py --out benchmarks/results/quant_speed.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from step_cache_overhead import LATENT, WAN_1_3B, denoise, timed

import tempocache as tc
from tempocache.quant.linear import QuantLinear, clear_input_cache
from tempocache.quant import numerics
from tempocache.quant.numerics import kernel_matmul, quantize_rows, simulated_matmul
from tempocache.quant.quantize import quantizable_linears

TOKENS = LATENT[2] * (LATENT[3] // 2) * (LATENT[4] // 2)
TEXT_TOKENS = 512
SMALL_LATENT = (1, 16, 5, 30, 52)  # for fitting TimestepAdaptive's predictor: every block call is re-run once per linear


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**WAN_1_3B)
    return model.to(torch.bfloat16).eval()


def torchao_fp8(model: torch.nn.Module) -> None:
    """torchao's float8 dynamic-activation row-wise config, on the same layers as ours."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    names = {name for name, _ in quantizable_linears(model)}
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=lambda m, fqn: fqn in names)


def event_time(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_check(model: torch.nn.Module) -> dict:
    """Largest relative difference between the 8-bit GPU kernels and the simulated numerics, per format."""
    g = torch.Generator("cuda").manual_seed(0)
    shapes = sorted({(m.in_features, m.out_features) for n, _ in quantizable_linears(model) for m in [model.get_submodule(n)]})
    result = {}
    for fmt in ("fp8", "int8"):
        worst = 0.0
        for k, n in shapes:
            x = torch.randn(1024, k, generator=g, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, generator=g, device="cuda", dtype=torch.bfloat16) / k**0.5
            a_q, a_s = quantize_rows(x, fmt)
            w_q, w_s = quantize_rows(w, fmt)
            reference = simulated_matmul(a_q, a_s, w_q, w_s, None, torch.float32)
            kernel = kernel_matmul(a_q, a_s, w_q, w_s, None, torch.bfloat16).float()
            worst = max(worst, ((kernel - reference).norm() / reference.norm()).item())
        result[fmt] = worst
    return result


def linear_time_per_step(model: torch.nn.Module) -> float:
    """Milliseconds per step spent in the block linears, each timed alone at this latent's token counts."""
    g = torch.Generator("cuda").manual_seed(0)
    inputs = {}
    total = 0.0
    for name, _ in quantizable_linears(model):
        module = model.get_submodule(name)
        in_features = module.in_features if isinstance(module, QuantLinear) else module.weight.shape[1]
        rows = TEXT_TOKENS if "attn2.to_k" in name or "attn2.to_v" in name else TOKENS
        key = (rows, in_features, name.split(".", 2)[2])
        if key not in inputs:
            x = torch.randn(1, rows, in_features, generator=g, device="cuda", dtype=torch.bfloat16)
            inputs[key] = event_time(lambda: (clear_input_cache(), module(x)))  # each layer pays its own quantization
        total += inputs[key]
    return total


def model_bytes() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def per_step(model: torch.nn.Module, steps: int, repeats: int) -> dict:
    denoise(model, 2)  # warm-up
    result = timed(model, steps, repeats)
    return {"ms_per_step": 1000 * result["seconds"] / steps, "peak_gib": result["peak_gib"]}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8, help="steps timed for the per-step figures")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.7])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows, linears = {}, {}

    empty = model_bytes()
    model = build()
    bf16_model_bytes = model_bytes() - empty
    bf16_linear_bytes = sum(model.get_submodule(n).weight.numel() * 2 for n, _ in quantizable_linears(model))
    checks = kernel_check(model)
    print(f"kernels vs simulated numerics, worst relative difference: {checks}", flush=True)
    profile = tc.calibrate_quant(model, [0], run=lambda m, seed: denoise(m, 10, seed, SMALL_LATENT), format="fp8")
    linears["bf16"] = linear_time_per_step(model)
    rows["bf16"] = per_step(model, args.steps, args.repeats)
    full = timed(model, 50, 1)
    print(f"bf16: {rows['bf16']}, 50 steps {full['seconds']:.2f} s", flush=True)

    def quantized(label: str, quantize) -> torch.nn.Module:
        model = build()
        state = quantize(model)
        saved = bf16_model_bytes - (model_bytes() - empty)
        rows[label] = {"weight_bytes": bf16_linear_bytes - saved, **per_step(model, args.steps, args.repeats)}
        if state is not None:
            rows[label]["low_precision_share"] = state.stats()["low_precision_share"]
        print(f"{label}: {rows[label]}", flush=True)
        return model

    del model
    model = quantized("torchao fp8 (row-wise dynamic)", torchao_fp8)
    linears["torchao fp8"] = linear_time_per_step(model)
    del model
    for budget in args.budgets:
        model = quantized(f"ours TimestepAdaptive fp8 budget={budget}", lambda m: tc.quantize(m, tc.TimestepAdaptive(budget, "fp8", profile=profile)))
        del model
    model = quantized("ours W8A8 fp8", lambda m: tc.quantize(m, tc.W8A8("fp8")))
    linears["ours fp8"] = linear_time_per_step(model)
    numerics.FUSE_ON_GPU = False
    linears["ours fp8, activations quantized in eager mode"] = linear_time_per_step(model)
    numerics.FUSE_ON_GPU = True
    cache_profile = tc.calibrate(model, [0], run=lambda m, seed: denoise(m, 50, seed), auto_budgets=())  # on the quantized model
    tc.enable(model, tc.Auto(budget=0.33, profile=cache_profile))
    denoise(model, 50)  # warm-up
    cached = timed(model, 50, 2)
    rows["ours W8A8 fp8 + Auto(0.33), 50 steps"] = {
        "seconds": cached["seconds"], "peak_gib": cached["peak_gib"], "compute_fraction": tc.stats(model)["compute_fraction"],
        "speedup_vs_bf16_full_compute": full["seconds"] / cached["seconds"]}
    print(f"ours + Auto: {rows['ours W8A8 fp8 + Auto(0.33), 50 steps']}", flush=True)

    base = rows["bf16"]["ms_per_step"]
    for row in rows.values():
        if "ms_per_step" in row:
            row["speedup_per_step"] = base / row["ms_per_step"]
            row["weight_memory_ratio"] = bf16_linear_bytes / row.get("weight_bytes", bf16_linear_bytes)
    result = {
        "model": "WanTransformer3DModel, Wan2.1-1.3B config, random weights, bf16", "latent": LATENT, "tokens": TOKENS,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
        "kernel_vs_simulated_relative_difference": checks, "block_linear_weight_bytes_bf16": bf16_linear_bytes,
        "block_linears_ms_per_step": linears, "ours_vs_torchao_linears_speed": linears["torchao fp8"] / linears["ours fp8"],
        "bf16_full_50_steps_seconds": full["seconds"], "rows": rows,
        "command": "python benchmarks/quant_speed.py --out benchmarks/results/quant_speed.json",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
