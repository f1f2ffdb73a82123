"""Step-cache overhead and speedup on a Wan2.1-1.3B-shaped transformer (random weights, bf16).

50 denoising steps of a 480p x 81-frame latent (32,760 tokens), one branch, timed on the GPU:
full compute; the cache enabled but computing every step (FirstBlockCache at threshold 0,
which measures its signal each step, and Auto at budget 1.0); Auto at budget 0.33 with a
profile calibrated on this model. Same process, warm-up excluded, median of repeats.

    python benchmarks/step_cache_overhead.py --out benchmarks/results/step_cache_overhead.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
import types
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

import tempocache as tc

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024)
LATENT = (1, 16, 21, 60, 104)  # 81 frames at 480x832 through Wan's VAE (4x temporal, 8x spatial)


def denoise(model: torch.nn.Module, steps: int, seed: int = 0, latent: tuple[int, ...] = LATENT) -> torch.Tensor:
    generator = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(latent, generator=generator, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, 512, 4096, generator=generator, device="cuda", dtype=torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(steps, device="cuda")
    for i, t in enumerate(scheduler.timesteps):
        with model.cache_context("cond", step_index=i, num_inference_steps=steps):
            v = model(x, timestep=t.expand(1), encoder_hidden_states=text, return_dict=False)[0]
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


def timed(model: torch.nn.Module, steps: int, repeats: int) -> dict:
    seconds = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        denoise(model, steps)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {"seconds": statistics.median(seconds), "all_seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.33)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = WanTransformer3DModel(**WAN_1_3B).to("cuda", torch.bfloat16).eval()
    denoise(model, 3)  # warm-up
    full = timed(model, args.steps, args.repeats)
    start = time.perf_counter()
    profile = tc.calibrate(types.SimpleNamespace(transformer=model), [0], run=lambda pipe, seed: denoise(pipe.transformer, args.steps, seed), auto_budgets=())
    calibrate_seconds = time.perf_counter() - start
    print(f"full compute {full['seconds']:.2f} s; calibrated in {calibrate_seconds:.0f} s", flush=True)
    rows = {"full compute": {**full, "compute_fraction": 1.0}}
    for label, config in (("FirstBlockCache(threshold=0)", tc.FirstBlockCache(threshold=0.0)),
                          ("Auto(budget=1.0)", tc.Auto(budget=1.0, profile=profile)),
                          (f"Auto(budget={args.budget})", tc.Auto(budget=args.budget, profile=profile))):
        tc.enable(model, config)
        result = timed(model, args.steps, args.repeats)
        rows[label] = {**result, "compute_fraction": tc.stats(model)["compute_fraction"], "peak_cache_gib": tc.stats(model)["peak_cache_bytes"] / 2**30}
        tc.disable(model)
    for row in rows.values():
        row["speedup"] = full["seconds"] / row["seconds"]
    result = {
        "model": "WanTransformer3DModel, Wan2.1-1.3B config, random weights, bf16",
        "latent": LATENT, "tokens": 21 * 30 * 52, "steps": args.steps, "repeats": args.repeats,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
        "calibrate_seconds": round(calibrate_seconds, 1), "rows": rows,
        "command": "python benchmarks/step_cache_overhead.py --out benchmarks/results/step_cache_overhead.json",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for label, row in rows.items():
        print(f"{label:32s} {row['seconds']:7.2f} s  x{row['speedup']:.3f}  compute {row['compute_fraction']:.2f}  peak {row['peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
