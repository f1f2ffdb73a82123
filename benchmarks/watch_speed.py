"""Streaming understanding at full size: a 7B-shaped video-LLM (random weights, bf16) watching an hour of video.

`LlavaForConditionalGeneration` with a SigLIP-so400m-shaped vision tower over 224x224 frames
(patches of 16: 196 tokens a frame) and a Qwen2-7B-shaped text model (28 layers, 28 query and
4 key-value heads of 128), read by `tempocache.watch` a chunk of frames at a time, each frame
under a sinks + window view (cost does not depend on the weights). One hour at 0.5 fps is
1,800 frames (352,800 tokens). Per memory policy: frames read per second (after a warm-up
chunk), the KV bytes on the device and on the host at the end, peak device memory, and the
time to answer a question at the end (median of three), and how long a stream could grow before
memory runs out, projected from the bytes each frame adds (the device's free memory for a policy
that holds every frame there, the host's available memory for one that offloads; none where
memory stays flat). Re-encoding the whole stream to answer costs what full KV's reading of it
costs, plus its answer.

    python benchmarks/watch_speed.py --out benchmarks/results/watch_speed.json   # on the GPU: scripts/device_watch.sh
    python benchmarks/watch_speed.py --tiny --out /tmp/watch_speed.json   # a CPU smoke run, measures nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from tempocache import kv
from tempocache.reference import vqa
from tempocache.understanding import ReKV, watch

VISION_SO400M = dict(image_size=224, patch_size=16, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                     num_attention_heads=16)
TEXT_QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4)
TINY_VISION = dict(image_size=48, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
QUESTION = "which shape entered first"


def policies(window: int) -> dict[str, kv.KVConfig]:
    held = window + vqa.SINK_FRAMES
    return {"full KV": kv.FullKV(), f"sinks + window ({held} frames)": kv.Sinks(frames=held, sink_frames=vqa.SINK_FRAMES),
            f"ReKV ({held} frames, top 16)": ReKV(frames=held, sink_frames=vqa.SINK_FRAMES, top_k=16),
            f"ReKV ({held} frames, top 16), int4 host": ReKV(frames=held, sink_frames=vqa.SINK_FRAMES, top_k=16,
                                                            quant=kv.KVQuant(bits=4)),
            f"ReKV ({held} frames, top 16), int2 host": ReKV(frames=held, sink_frames=vqa.SINK_FRAMES, top_k=16,
                                                            quant=kv.KVQuant(bits=2))}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def frames_until_full(stats: dict, frames: int, device: torch.device) -> dict:
    """The frames a stream could reach before the device's free memory (where every frame is held there) or the
    host's available memory (where frames are offloaded) runs out, at the bytes a frame adds; None where flat."""
    projected = {"device": None, "host": None}
    if stats["device_frames"] == frames and device.type == "cuda":
        projected["device"] = int(frames + torch.cuda.mem_get_info()[0] / (stats["device_kv_bytes"] / frames))
    if stats["host_frames"]:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        projected["host"] = int(frames + available / (stats["host_kv_bytes"] / stats["host_frames"]))
    return projected


def measure(model, memory: kv.KVConfig, frames: int, chunk: int, device: torch.device) -> dict:
    size = model.config.vision_config.image_size
    watcher = watch(model, memory, chunk)
    watcher.add(torch.rand(chunk, 3, size, size, device=device))  # warm-up
    watcher.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    for _ in range(0, frames, chunk):
        watcher.add(torch.rand(chunk, 3, size, size, device=device))
    sync(device)
    seconds = time.perf_counter() - start
    answers = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        watcher.ask(QUESTION)
        sync(device)
        answers.append(time.perf_counter() - t0)
    stats = watcher.stats()
    return {**stats, "read_seconds": round(seconds, 2), "frames_per_second": round(frames / seconds, 2),
            "answer_seconds": round(statistics.median(answers), 4),
            "frames_until_full": frames_until_full(stats, frames, device),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1800, help="frames watched (1,800: an hour at 0.5 fps)")
    parser.add_argument("--chunk", type=int, default=4, help="frames read at a time")
    parser.add_argument("--window", type=int, default=vqa.WINDOW_FRAMES, help="frames of the sinks + window view")
    parser.add_argument("--only", nargs="+", default=None, help="run the memories whose names contain one of these")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    torch.manual_seed(0)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    torch.set_default_dtype(dtype)  # built in its dtype, on its device: 7B parameters
    with device:
        model = vqa.build_model(TINY_VISION if args.tiny else VISION_SO400M, TINY_TEXT if args.tiny else TEXT_QWEN2_7B,
                                window=args.window).eval()
    torch.set_default_dtype(torch.float32)
    result = {"model": "LlavaForConditionalGeneration: SigLIP-so400m-shaped vision (224x224, 196 tokens a frame), "
                       "Qwen2-7B-shaped text, random weights, bf16" if not args.tiny else "tiny",
              "frames": args.frames, "chunk_frames": args.chunk, "window": args.window,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__,
              "date": datetime.date.today().isoformat(), "policies": {},
              "command": " ".join(["python benchmarks/watch_speed.py", *sys.argv[1:]])}
    chosen = {n: m for n, m in policies(args.window).items() if not args.only or any(o in n for o in args.only)}
    if not chosen:
        raise SystemExit(f"no memory's name contains any of {args.only}: {', '.join(policies(args.window))}")
    for name, memory in chosen.items():
        result["policies"][name] = row = measure(model, memory, args.frames, args.chunk, device)
        print(name, json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    if "full KV" in result["policies"]:
        full = result["policies"]["full KV"]
        result["reencode_answer_seconds"] = round(full["read_seconds"] + full["answer_seconds"], 2)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
