"""How reading quantized frames costs on shapes-ar: a window of 8 exact frames beside `kv.Auto` at the same KV memory,
its quantized frames read by fused attention a layer at a time at every call (the default), rebuilt once a chunk and
held for its steps (`rebuild_frames="chunk"`), or blockwise, 4 frames at a time.

Two captions streamed side by side, 3 steps, guidance 2; the median seconds per chunk over chunks 9 to 12.

    python benchmarks/stream_read.py --out benchmarks/results/stream_read_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from tempocache import kv
from tempocache.generation import load_pipeline
from tempocache.streaming import stream

PROMPTS = ["a red circle moves right on a black background", "a blue square moves up on a white background"]
SETTINGS = {"window 8": kv.SlidingWindow(frames=8), "Auto, 8 frames' memory, fused read": kv.Auto(memory_frames=8),
            "Auto, 8 frames' memory, fused read, rebuilt once a chunk": kv.Auto(memory_frames=8, rebuild_frames="chunk"),
            "Auto, 8 frames' memory, blockwise read (4 frames)": kv.Auto(memory_frames=8, rebuild_frames=4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pipe = load_pipeline("shapes-ar", args.device)
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if pipe.device.type ==
              "cuda" else platform.processor() or platform.machine(), "torch": torch.__version__, "settings": {}}
    for name, config in SETTINGS.items():
        s, times = stream(pipe, PROMPTS, steps=3, kv=config), []
        for _ in range(12):
            start = time.perf_counter()
            next(s)
            sync()
            times.append(time.perf_counter() - start)
        result["settings"][name] = {"s_per_chunk": statistics.median(times[8:]), "held_frames": len(s.cache.held),
                                    "kv_bytes": s.stats()["kv_bytes"]}
        s.close()
        print(name, result["settings"][name], flush=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
