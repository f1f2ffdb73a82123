"""torch.compile with the step cache on a Wan2.1-1.3B-shaped transformer (random weights, bf16).

The latent of step_cache_overhead.py (480p x 81 frames, 32,760 tokens), one branch, a schedule of
--steps steps. For each way of compiling (none; diffusers' regional `compile_repeated_blocks()`;
the whole model, `model.compile()`) and each setting (full compute, StaticCache(interval=3),
zero-shot Auto(budget=0.33)): a first generation (which compiles), then --repeats timed ones.
Recorded: seconds per generation, graphs dynamo made (after the first generation and after the
timed ones: equal means no step or generation recompiled), graph breaks and their reasons,
recompiles, the share of block calls computed, and how far the output is from the same setting
run eagerly. Every row runs on the same model, rebuilt once; dynamo is reset between rows.

    python benchmarks/step_cache_compile.py --out benchmarks/results/step_cache_compile.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from step_cache_overhead import LATENT, WAN_1_3B, denoise
from torch._dynamo.utils import counters

import tempocache as tc

SETTINGS = {
    "full compute": lambda: None,
    "StaticCache(interval=3)": lambda: tc.StaticCache(interval=3),
    "Auto(budget=0.33, zero_shot=True)": lambda: tc.Auto(budget=0.33, zero_shot=True),
}


def generation_seconds(model: torch.nn.Module, steps: int) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    x = denoise(model, steps)
    torch.cuda.synchronize()
    return time.perf_counter() - start, x


def run_row(model: torch.nn.Module, compile_mode: str, setting: str, steps: int, repeats: int) -> dict:
    torch._dynamo.reset()
    counters.clear()
    config = SETTINGS[setting]()
    if config is not None:
        tc.enable(model, config)
    try:
        if compile_mode == "regional":
            model.compile_repeated_blocks()
        elif compile_mode == "whole":
            model.compile()
        first, x = generation_seconds(model, steps)
        graphs_first = counters["stats"]["unique_graphs"]
        seconds = [generation_seconds(model, steps)[0] for _ in range(repeats)]
        stats = tc.stats(model) if config is not None else {"compute_fraction": 1.0}
    finally:
        if config is not None:
            tc.disable(model)
        for module in model.modules():  # undo compile: the next row starts from the eager model
            module._compiled_call_impl = None
    return {
        "compile": compile_mode, "setting": setting, "first_generation_seconds": round(first, 2),
        "seconds": statistics.median(seconds), "all_seconds": seconds,
        "graphs_after_first_generation": graphs_first, "graphs_after_all": counters["stats"]["unique_graphs"],
        "graph_breaks": dict(counters["graph_break"]), "recompiles": sum(counters["recompiles"].values()),
        "compute_fraction": round(stats["compute_fraction"], 3), "output": x,
    }


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", nargs="+", default=["none", "regional", "whole"], choices=["none", "regional", "whole"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = WanTransformer3DModel(**WAN_1_3B).to("cuda", torch.bfloat16).eval()
    denoise(model, 2)  # warm-up
    result = {
        "model": "WanTransformer3DModel, Wan2.1-1.3B config, random weights, bf16", "latent": LATENT,
        "tokens": 21 * 30 * 52, "steps": args.steps, "repeats": args.repeats, "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "date": datetime.date.today().isoformat(), "rows": [],
        "command": "python benchmarks/step_cache_compile.py --out benchmarks/results/step_cache_compile.json",
    }
    eager_outputs = {}
    for compile_mode in args.compile:
        for setting in SETTINGS:
            row = run_row(model, compile_mode, setting, args.steps, args.repeats)
            output = row.pop("output").float()
            eager = eager_outputs.setdefault(setting, output)
            row["max_abs_diff_from_eager"] = float((output - eager).abs().max())
            row["output_rms"] = float(output.pow(2).mean().sqrt())
            result["rows"].append(row)
            full = next(r for r in result["rows"] if r["compile"] == compile_mode and r["setting"] == "full compute")
            row["speedup_vs_same_compile_full"] = round(full["seconds"] / row["seconds"], 3)
            eager_row = next(r for r in result["rows"] if r["compile"] == "none" and r["setting"] == "full compute")
            row["speedup_vs_eager_full"] = round(eager_row["seconds"] / row["seconds"], 3)
            print(f"{compile_mode:8s} {setting:34s} {row['seconds']:6.2f} s  first {row['first_generation_seconds']:6.1f} s  "
                  f"graphs {row['graphs_after_first_generation']}->{row['graphs_after_all']}  recompiles {row['recompiles']}  "
                  f"x{row['speedup_vs_same_compile_full']:.2f} vs its full  diff {row['max_abs_diff_from_eager']:.3g}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
