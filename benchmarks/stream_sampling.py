"""How shapes-ar's sampling settings set its quality: semantic accuracy of held-out captions streamed with the trained
context (a 28-frame window) and a short one (8 frames), by denoising steps per chunk and guidance.

    python benchmarks/stream_sampling.py --device cuda --out benchmarks/results/stream_sampling_shapes-ar_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

from tempocache import kv
from tempocache.eval.stream_quality import evaluate_stream
from tempocache.generation import load_pipeline

POLICIES = {"window 28": kv.SlidingWindow(frames=28), "window 8": kv.SlidingWindow(frames=8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--captions", type=int, default=32)
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.5])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pipe = load_pipeline("shapes-ar", args.device, getattr(torch, args.dtype))
    result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if pipe.device.type ==
              "cuda" else platform.processor() or platform.machine(), "dtype": args.dtype, "captions": args.captions,
              "frames": args.frames, "settings": []}
    for steps in args.steps:
        for guidance in args.guidance:
            run = evaluate_stream(pipe, POLICIES, args.captions, args.frames, every=16, steps=steps, guidance=guidance,
                                  device=args.device, full_kv=False, timing_chunks=1)
            for name, row in run["policies"].items():
                result["settings"].append({"steps": steps, "guidance": guidance, "kv": name, "starts": run["starts"],
                                           "accuracy": row["accuracy"], "seconds": row["seconds"]})
                first = row["accuracy"][0]
                print(f"steps {steps} guidance {guidance} {name}: first window colour {first['colour']:.2f} shape "
                      f"{first['shape']:.2f} motion {first['motion']:.2f}; last {row['accuracy'][-1]['all']:.2f}",
                      flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
