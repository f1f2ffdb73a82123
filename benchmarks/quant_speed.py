"""Quantization speed and memory on a Wan2.1-1.3B-shaped transformer (random weights, bf16 baseline).

One process on the GPU, the latent of step_cache_overhead.py (480p x 81 frames, 32,760 tokens):
- the GPU kernels against the simulated numerics, on the model's own layer shapes;
- the block linears alone, per step: bf16, torchao's float8 row-wise dynamic quantization, ours W8A8 FP8;
- FP8 attention (cuDNN) against its simulated numerics and exact attention, and per call against bf16 SDPA;
- whole steps (median of repeats over a short schedule): bf16, torchao FP8, ours W8A8 FP8 with and without FP8
  attention, ours TimestepAdaptive with FP8 attention at two budgets (predictor fitted in the run on the bf16
  model, 10 steps of a small latent);
- 50 steps end to end: bf16 full compute against ours W8A8 FP8 + FP8 attention + Auto(budget=0.33), the cache
  profiled on the quantized model;
- weight memory of the quantized layers (bf16 bytes less what quantizing freed, read from the allocator), peak memory;
- one step's GPU time by kernel (torch.profiler), bf16 and ours W8A8 FP8 + FP8 attention.
A measurement that fails is recorded under "errors" and the others still run; the JSON is rewritten after each.
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
from tempocache.quant.attention import FP8Attention, quantize_qkv, simulated_attention
from tempocache.quant.linear import QuantLinear
from tempocache.quant.numerics import kernel_matmul, quantize_rows, simulated_matmul
from tempocache.quant.quantize import quant_state, quantizable_linears

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


def attention_check() -> dict:
    """FP8 attention at Wan-1.3B's head shape: the cuDNN kernel against the simulated numerics and both against
    exact attention (4,000 tokens: padded to whole tiles and masked; q, k and v laid out as diffusers' native
    backend passes them), and per call at this latent's 32,760 tokens, ours against bf16 SDPA."""
    g = torch.Generator("cuda").manual_seed(0)
    heads, dim = WAN_1_3B["num_attention_heads"], WAN_1_3B["attention_head_dim"]

    def qkv(tokens):
        return [torch.randn(1, tokens, heads, dim, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]

    q, k, v = qkv(4000)
    fp8_attention = FP8Attention()
    kernel = fp8_attention(q, k, v).float()
    simulated = simulated_attention(*quantize_qkv(q, k, v), dim ** -0.5, torch.float32)
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    relative = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    q, k, v = qkv(TOKENS)
    return {"kernel_vs_simulated": relative(kernel, simulated), "kernel_vs_exact": relative(kernel, exact),
            "simulated_vs_exact": relative(simulated, exact),
            "ms_per_call": {"bf16 SDPA": event_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)),
                            "ours fp8 (quantize, cuDNN, dequantize)": event_time(lambda: fp8_attention(q, k, v))}}


def forget_input(module: torch.nn.Module) -> None:
    if isinstance(module, QuantLinear):
        module.activations.clear()


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
            inputs[key] = event_time(lambda: (forget_input(module), module(x)))  # each layer pays its own quantization
        total += inputs[key]
        forget_input(module)  # the last input and its 8-bit copy (up to 0.9 GB) must not count in the next model's memory
    return total


def model_bytes() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def per_step(model: torch.nn.Module, steps: int, repeats: int) -> dict:
    denoise(model, 2)  # warm-up
    result = timed(model, steps, repeats)
    return {"ms_per_step": 1000 * result["seconds"] / steps, "peak_gib": result["peak_gib"]}


def kernel_breakdown(model: torch.nn.Module, top: int = 12) -> dict:
    """GPU time of one step by kernel (torch.profiler): where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        denoise(model, 1)
        torch.cuda.synchronize()
    kernels = [(e.key, e.self_device_time_total / 1000) for e in prof.key_averages() if e.self_device_time_total > 0]
    kernels.sort(key=lambda kv: -kv[1])
    return {"total_ms": sum(ms for _, ms in kernels), "top_ms": {name[:120]: ms for name, ms in kernels[:top]}}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8, help="steps timed for the per-step figures")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.7])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows, linears, breakdown, errors = {}, {}, {}, {}
    result = {
        "model": "WanTransformer3DModel, Wan2.1-1.3B config, random weights, bf16", "latent": LATENT, "tokens": TOKENS,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
        "block_linears_ms_per_step": linears, "rows": rows, "kernel_breakdown_one_step": breakdown, "errors": errors,
        "command": "python benchmarks/quant_speed.py --out benchmarks/results/quant_speed.json",
    }

    def save() -> None:
        base = rows.get("bf16", {}).get("ms_per_step")
        for row in rows.values():
            if base and "ms_per_step" in row:
                row["speedup_per_step"] = base / row["ms_per_step"]
                row["weight_memory_ratio"] = result["block_linear_weight_bytes_bf16"] / row.get("weight_bytes", result["block_linear_weight_bytes_bf16"])
        if "ours fp8" in linears and "torchao fp8" in linears:
            result["ours_vs_torchao_linears_speed"] = linears["torchao fp8"] / linears["ours fp8"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    def attempt(label: str, fn):
        """Run one measurement; a failure is recorded and the others still run."""
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - any failure of one measurement
            errors[label] = f"{type(error).__name__}: {error}"[:500]
            print(f"FAILED {label}: {errors[label]}", flush=True)
        finally:
            save()

    empty = model_bytes()
    model = build()
    bf16_model_bytes = model_bytes() - empty
    result["block_linear_weight_bytes_bf16"] = bf16_linear_bytes = sum(model.get_submodule(n).weight.numel() * 2 for n, _ in quantizable_linears(model))
    result["kernel_vs_simulated_relative_difference"] = kernel_check(model)
    print(f"kernels vs simulated numerics, worst relative difference: {result['kernel_vs_simulated_relative_difference']}", flush=True)
    result["fp8_attention"] = attempt("fp8 attention check", attention_check)
    print(f"FP8 attention: {result['fp8_attention']}", flush=True)
    profile = attempt("calibrate_quant", lambda: tc.calibrate_quant(model, [0], run=lambda m, seed: denoise(m, 10, seed, SMALL_LATENT), format="fp8"))
    linears["bf16"] = linear_time_per_step(model)
    rows["bf16"] = per_step(model, args.steps, args.repeats)
    full = timed(model, 50, 1)
    result["bf16_full_50_steps_seconds"] = full["seconds"]
    breakdown["bf16"] = attempt("bf16 breakdown", lambda: kernel_breakdown(model))
    print(f"bf16: {rows['bf16']}, 50 steps {full['seconds']:.2f} s", flush=True)
    model = None  # frees the bf16 model before the next is built

    def quantized(label: str, quantize, after=None) -> None:
        def measure():
            model = build()
            state = quantize(model)
            saved = bf16_model_bytes - (model_bytes() - empty)
            rows[label] = {"weight_bytes": bf16_linear_bytes - saved, **per_step(model, args.steps, args.repeats)}
            if state is not None:
                stats = state.stats()
                rows[label]["low_precision_share"] = stats["low_precision_share"]
                if stats["attention_fp8_calls"] or stats["attention_exact_calls"]:
                    rows[label]["attention_calls"] = {"fp8": stats["attention_fp8_calls"], "exact": stats["attention_exact_calls"]}
            print(f"{label}: {rows[label]}", flush=True)
            if after is not None:
                after(model)
        attempt(label, measure)
        gc.collect()

    quantized("torchao fp8 (row-wise dynamic)", torchao_fp8, after=lambda m: linears.update({"torchao fp8": linear_time_per_step(m)}))

    def linears_ours(model: torch.nn.Module) -> None:
        linears["ours fp8"] = linear_time_per_step(model)
        quant_state(model).activations.fuse = False
        linears["ours fp8, activations quantized in eager mode"] = linear_time_per_step(model)
        quant_state(model).activations.fuse = True

    quantized("ours W8A8 fp8", lambda m: tc.quantize(m, tc.W8A8("fp8")), after=linears_ours)
    if profile is not None:
        for budget in args.budgets:
            quantized(f"ours TimestepAdaptive fp8 budget={budget} + fp8 attention",
                      lambda m: tc.quantize(m, tc.TimestepAdaptive(budget, "fp8", profile=profile, attention=True)))

    def with_auto(model: torch.nn.Module) -> None:
        breakdown["ours W8A8 fp8 + fp8 attention"] = attempt("ours breakdown", lambda: kernel_breakdown(model))
        label = "ours W8A8 fp8 + fp8 attention + Auto(0.33), 50 steps"
        cache_profile = tc.calibrate(model, [0], run=lambda m, seed: denoise(m, 50, seed), auto_budgets=())  # on the quantized model
        tc.enable(model, tc.Auto(budget=0.33, profile=cache_profile))
        denoise(model, 50)  # warm-up
        cached = timed(model, 50, 2)
        rows[label] = {"seconds": cached["seconds"], "peak_gib": cached["peak_gib"], "compute_fraction": tc.stats(model)["compute_fraction"],
                       "speedup_vs_bf16_full_compute": full["seconds"] / cached["seconds"]}
        print(f"{label}: {rows[label]}", flush=True)

    quantized("ours W8A8 fp8 + fp8 attention", lambda m: tc.quantize(m, tc.W8A8("fp8", attention=True)), after=with_auto)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
