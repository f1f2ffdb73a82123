"""RegionE's speed at full size: a FLUX.1-shaped Kontext transformer (random weights, bf16) editing with fixed masks.

`FluxTransformer2DModel` in the FLUX.1 config (19 dual-stream and 38 single-stream blocks,
3072 wide, guidance embedding as in FLUX.1 Kontext [dev]), a 1024x1024 target and a 1024x1024
image edited in context (4,096 + 4,096 image tokens, their ids offset on the first axis as
`FluxKontextPipeline` places them) and 512 text tokens, batch 1, one transformer call per step
(guidance-distilled, no CFG), `FlowMatchEulerDiscreteScheduler` at 28 steps, RegionE's own
schedule for 28 steps (partition after step 5, a refresh at 15, the last 2 in full). The edit
mask is fixed (a centred square of 10%, 30%, 60% and 100% of the target's tokens, in place of
the partition RegionE would compute from the estimate; everything else is RegionE's own path),
so that cost alone is measured: cost does not depend on the weights. Per mask: seconds per
edit (median of --repeats after a warm-up), the speedup over the full edit timed the same way,
and the share of tokens computed. With 100% the region path computes every target token: its
overhead against the full edit. RegionE's own fallback (more than `max_edited` edited: the
edit runs in full) is switched off here to measure that.

    python benchmarks/region_speed.py --out benchmarks/results/region_speed.json
    python benchmarks/region_speed.py --tiny --out /tmp/region_speed.json   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

import tempocache as tc
import tempocache.region.engine as region_engine

FLUX_1 = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56))
TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
MASKS = (0.1, 0.3, 0.6, 1.0)
SCHEDULE = dict(partition_step=5, refresh_steps=(15,), final_steps=2)  # RegionE's for FLUX.1 Kontext at 28 steps


def ids(side: int, first: int, device) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([torch.full_like(rows, first), rows, cols], -1).reshape(-1, 3).float().to(device)


def square_mask(side: int, fraction: float, device) -> torch.Tensor:
    """(1, side * side) bool: a centred square holding `fraction` of the tokens (rounded to whole rows)."""
    edge = max(1, round(side * fraction ** 0.5))
    start = (side - edge) // 2
    mask = torch.zeros(side, side, dtype=torch.bool, device=device)
    mask[start:start + edge, start:start + edge] = True
    return mask.reshape(1, -1)


def edit_seconds(pipe, inputs: dict, steps: int, device) -> float:
    scheduler, transformer = pipe.scheduler, pipe.transformer
    scheduler.set_timesteps(steps, device=device)
    x = inputs["latents"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for t in scheduler.timesteps:
        with transformer.cache_context("cond"):
            v = transformer(hidden_states=torch.cat([x, inputs["reference"]], 1), timestep=(t / 1000).expand(1),
                            guidance=inputs["guidance"], pooled_projections=inputs["pooled"],
                            encoder_hidden_states=inputs["text"], txt_ids=inputs["txt_ids"], img_ids=inputs["img_ids"],
                            return_dict=False)[0][:, :x.shape[1]]
        x = scheduler.step(v, t, x, return_dict=False)[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, measures nothing")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    config, side, text_tokens = (TINY, 8, 16) if args.tiny else (FLUX_1, 64, 512)
    torch.manual_seed(0)
    with device:
        transformer = FluxTransformer2DModel(**config).to(torch.bfloat16).eval()
        inputs = {"latents": torch.randn(1, side * side, config["in_channels"], dtype=torch.bfloat16),
                  "reference": torch.randn(1, side * side, config["in_channels"], dtype=torch.bfloat16),
                  "text": torch.randn(1, text_tokens, config["joint_attention_dim"], dtype=torch.bfloat16),
                  "pooled": torch.randn(1, config["pooled_projection_dim"], dtype=torch.bfloat16),
                  "guidance": torch.full((1,), 2.5), "txt_ids": torch.zeros(text_tokens, 3),
                  "img_ids": torch.cat([ids(side, 0, device), ids(side, 1, device)])}
    pipe = SimpleNamespace(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    result = {"model": "FluxTransformer2DModel, FLUX.1 config with guidance embedding, random weights, bf16",
              "tokens": {"target": side * side, "image_edited": side * side, "text": text_tokens}, "steps": args.steps,
              "schedule": SCHEDULE, "device": "cpu" if args.tiny else torch.cuda.get_device_name(),
              "torch": torch.__version__, "date": datetime.date.today().isoformat(), "batch": 1, "rows": {},
              "command": "python benchmarks/region_speed.py --out benchmarks/results/region_speed.json"}

    def timed() -> list[float]:
        edit_seconds(pipe, inputs, args.steps, device)  # warm-up
        return [edit_seconds(pipe, inputs, args.steps, device) for _ in range(args.repeats)]

    full = timed()
    result["rows"]["full edit"] = {"seconds": statistics.median(full), "seconds_all": full}
    print("full edit", result["rows"]["full edit"], flush=True)
    partition = region_engine.edited_tokens
    try:
        for fraction in MASKS:
            mask = square_mask(side, fraction, device)
            region_engine.edited_tokens = lambda *a, mask=mask, **k: mask  # the fixed mask in place of the estimate's
            with tc.enabled(pipe, tc.RegionE(max_edited=1.0, **SCHEDULE)):
                seconds = timed()
                stats = tc.stats(pipe)
            row = {"mask_fraction": float(mask.float().mean()), "seconds": statistics.median(seconds), "seconds_all": seconds,
                   "speedup": result["rows"]["full edit"]["seconds"] / statistics.median(seconds),
                   "compute_fraction": stats["compute_fraction"], "region_calls_per_edit": stats["region_calls"] // (args.repeats + 1),
                   "full_calls_per_edit": stats["full_calls"] // (args.repeats + 1)}
            result["rows"][f"RegionE, {fraction:.0%} edited"] = row
            print(f"RegionE {fraction:.0%}", row, flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
    finally:
        region_engine.edited_tokens = partition


if __name__ == "__main__":
    main()
