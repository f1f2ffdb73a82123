"""Streaming speed at full size: a Wan2.1-1.3B-shaped causal model (random weights, bf16) with tempocache's KV cache.

`SkyReelsV2Transformer3DModel` (Wan's architecture with block-causal chunks and a noise level per
frame) in the Wan2.1-1.3B config, chunks of 3 latent frames at 480x832 (4,680 tokens), 4 Euler
steps per chunk, no classifier-free guidance (as in distilled streaming models), a sliding
window of 12 latent frames (`kv.SlidingWindow`), keys rotated at read time. A random-weight
`AutoencoderKLWan` decodes each chunk as it is made, keeping its causal convolution cache
across chunks (4 pixel frames per latent frame). Per setting, after a warm-up stream:
time to the first pixel frame of a fresh stream (its first chunk denoised, its first latent frame
decoded) and to its whole first chunk, median seconds per chunk (denoiser, and end to end
with decoding), pixel frames per second, KV bytes and peak memory after the stream.
After the bf16 settings, one long denoiser-only stream (bf16, last-step commit, no decoding) to
show memory flat with length and no position overflow (`--only-long`: it alone). Settings: commit by re-encoding (one more forward per chunk) or from the
last step; bf16, FP8 self-attention alone (cuDNN's, over the cache's keys and the chunk's) and
FP8 linears with FP8 attention (`tempocache.quantize`, last, since it is one-way). `--profile`
adds the CUDA kernels' time over a few chunks of each last-step setting, by kernel. `--compile` runs instead the bf16
last-step setting eagerly, then with the transformer's blocks compiled (inductor, diffusers'
`compile_repeated_blocks()`; the cache's self-attention stays eager), then with cuDNN autotuning
the decoder's convolutions too, then FP8 linears and attention on the compiled blocks.

    python benchmarks/stream_speed.py --out benchmarks/results/stream_speed.json
    python benchmarks/stream_speed.py --compile --out benchmarks/results/stream_speed_compiled.json
    python benchmarks/stream_speed.py --tiny --out /tmp/stream_speed.json   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel
from step_cache_overhead import WAN_1_3B
from torch._dynamo.utils import counters

import tempocache as tc
from tempocache import kv
from tempocache.models import QUANT, add_hook, attention_modules, find_blocks, remove_hook
from tempocache.quant.attention import FP8AttentionHook, FP8AttentionMode

LATENT = (16, 3, 60, 104)  # channels, latent frames per chunk, height, width: 480x832
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)


class StreamingDecoder:
    """AutoencoderKLWan's decoder run latent frame by latent frame, its causal convolution cache kept across chunks
    (what `AutoencoderKLWan._decode` does within one call)."""

    def __init__(self, vae: AutoencoderKLWan):
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        self.vae.clear_cache()
        self.first = True

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        vae, out = self.vae, []
        x = vae.post_quant_conv(z)
        for i in range(z.shape[2]):
            vae._conv_idx = [0]
            out.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=self.first))
            self.first = False
        return torch.cat(out, 2).clamp(-1, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Streamer:
    def __init__(self, model, text, config: kv.KVConfig, latent: tuple[int, ...], steps: int, device: torch.device):
        self.model, self.text, self.config, self.latent, self.steps, self.device = model, text, config, latent, steps, device
        patch = model.config.patch_size
        layout = kv.Layout(latent[1], latent[2] // patch[1], latent[3] // patch[2])
        self.cache = kv.KVCache(config, len(model.blocks), model.rope, layout)
        self.generator = torch.Generator(device).manual_seed(0)

    def velocity(self, x: torch.Tensor, t: float) -> torch.Tensor:
        timestep = torch.full((1, x.shape[2]), t, device=self.device)
        return self.model(hidden_states=x, timestep=timestep, encoder_hidden_states=self.text, enable_diffusion_forcing=True,
                          return_dict=False)[0]

    def chunk(self) -> torch.Tensor:
        x = torch.randn(1, *self.latent, generator=self.generator, device=self.device, dtype=self.text.dtype)
        sigmas = torch.linspace(1.0, 0.0, self.steps + 1).tolist()
        for sigma, following in zip(sigmas, sigmas[1:]):
            x = x + (following - sigma) * self.velocity(x, sigma * 1000)
        if self.config.commit == "reencode":
            self.velocity(x, 0.0)
        self.cache.commit()
        return x


@torch.no_grad()
def run_setting(model, vae, text, config, latent, steps, chunks, device) -> dict:
    streamer, decoder = Streamer(model, text, config, latent, steps, device), StreamingDecoder(vae)
    with kv.installed(model, streamer.cache):
        for _ in range(3):  # warm-up stream
            decoder.decode(streamer.chunk())
        streamer.cache.reset()
        decoder.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = time.perf_counter()
        z = streamer.chunk()
        decoder.decode(z[:, :, :1])  # the first latent frame: the first pixel frame can be shown
        sync(device)
        first_frame = time.perf_counter() - start
        decoder.decode(z[:, :, 1:])  # the decoder's causal cache carries over: the same frames as one call
        sync(device)
        first_chunk = time.perf_counter() - start
        denoise, total = [], []
        for _ in range(chunks - 1):
            t0 = time.perf_counter()
            z = streamer.chunk()
            sync(device)
            t1 = time.perf_counter()
            decoder.decode(z)
            sync(device)
            denoise.append(t1 - t0)
            total.append(time.perf_counter() - t0)
    pixel_frames = 4 * latent[1]
    return {"commit": config.commit, "chunks": chunks, "time_to_first_frame_s": round(first_frame, 4),
            "time_to_first_chunk_s": round(first_chunk, 4),
            "denoiser_s_per_chunk": statistics.median(denoise), "end_to_end_s_per_chunk": statistics.median(total),
            "denoiser_fps": pixel_frames / statistics.median(denoise), "end_to_end_fps": pixel_frames / statistics.median(total),
            "kv_bytes": streamer.cache.nbytes(), "held_latent_frames": len(streamer.cache.held),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


@torch.no_grad()
def kernel_profile(model, text, config, latent, steps, chunks, device, top: int = 15) -> list[dict]:
    """The `top` CUDA kernels by total time over `chunks` chunks of a warm stream: name, ms per chunk, share; first,
    every kernel's together (set beside the wall-clock, what is left is the host's)."""
    streamer = Streamer(model, text, config, latent, steps, device)
    with kv.installed(model, streamer.cache):
        for _ in range(3):
            streamer.chunk()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(chunks):
                streamer.chunk()
            sync(device)
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    events.sort(key=lambda e: -e.device_time_total)
    every = {"kernel": "(every kernel)", "ms_per_chunk": round(total / 1000 / chunks, 2), "share": 1.0}
    return [every] + [{"kernel": e.key[:120], "ms_per_chunk": round(e.device_time_total / 1000 / chunks, 2),
                       "share": round(e.device_time_total / total, 3)} for e in events[:top]]


def with_fp8_attention(model) -> FP8AttentionMode:
    """FP8 self-attention alone, the linears left in bf16 (`tempocache.quantize` takes both or the linears)."""
    mode = FP8AttentionMode()
    for module in attention_modules(find_blocks(model)):
        add_hook(module, FP8AttentionHook(mode), QUANT)
    return mode


@torch.no_grad()
def long_stream(model, text, config, latent, steps, chunks, device, checkpoints: tuple[int, ...], seconds: float) -> dict:
    """Denoiser only, for `chunks` chunks or `seconds`, whichever ends first: KV bytes and memory at each checkpoint
    (chunks made), and whether the last chunk's values are finite."""
    streamer, at = Streamer(model, text, config, latent, steps, device), {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with kv.installed(model, streamer.cache):
        start = time.perf_counter()
        for made in range(1, chunks + 1):
            z = streamer.chunk()
            if time.perf_counter() - start > seconds:
                checkpoints = (*checkpoints, made)
            if made in checkpoints:
                sync(device)
                at[made] = {"kv_bytes": streamer.cache.nbytes(), "seconds": round(time.perf_counter() - start, 1),
                            "allocated_gib": torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None,
                            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
            if made == checkpoints[-1]:
                break
    return {"chunks": made, "latent_frames": made * latent[1], "at": at, "finite": bool(torch.isfinite(z).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=100, help="chunks timed per setting")
    parser.add_argument("--long-chunks", type=int, default=1000, help="chunks of the long, denoiser-only stream")
    parser.add_argument("--long-seconds", type=float, default=240, help="time limit of the long stream")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--window", type=int, default=12, help="latent frames held")
    parser.add_argument("--only-long", action="store_true", help="stop after the long stream (bf16, last-step commit)")
    parser.add_argument("--profile", action="store_true", help="also the CUDA kernels' time, by kernel")
    parser.add_argument("--compile", action="store_true",
                        help="only the bf16 last-step setting eagerly, then with compiled blocks, cuDNN autotuning, FP8")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script, measures nothing")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    torch.manual_seed(0)
    config = {**(TINY if args.tiny else WAN_1_3B), "num_frame_per_block": LATENT[1]}
    latent = (16, 3, 8, 8) if args.tiny else LATENT
    with device:
        model = SkyReelsV2Transformer3DModel(**config).to(torch.bfloat16).eval()
        vae = AutoencoderKLWan(base_dim=8 if args.tiny else 96).to(torch.bfloat16).eval()
        text = torch.randn(1, 512, config["text_dim"], dtype=torch.bfloat16)
    result = {"model": "SkyReelsV2Transformer3DModel, Wan2.1-1.3B config, random weights, bf16; AutoencoderKLWan, random weights",
              "latent_chunk": latent, "tokens_per_chunk": latent[1] * latent[2] * latent[3] // 4, "steps": args.steps,
              "window_latent_frames": args.window, "device": torch.cuda.get_device_name() if not args.tiny else "cpu",
              "torch": torch.__version__, "date": datetime.date.today().isoformat(), "settings": {},
              "command": "python benchmarks/stream_speed.py --out benchmarks/results/stream_speed.json"}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    def measure(label: str, commit: str, fp8_calls=None, compiled: bool = False) -> None:
        config = kv.SlidingWindow(frames=args.window, commit=commit)
        counters.clear()
        row = run_setting(model, vae, text, config, latent, args.steps, args.chunks, device)
        if fp8_calls is not None:
            row["fp8_attention_calls"] = fp8_calls()
        if compiled:
            row["dynamo"] = {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
                             "recompiles": sum(counters["recompiles"].values())}
        result["settings"][label] = row
        print(label, json.dumps(row), flush=True)
        save()

    def measure_compiled() -> None:
        # The decoder is left eager: its causal convolution cache (None, then one frame, then two) recompiles it.
        model.compile_repeated_blocks()
        measure("bf16, last-step commit, compiled blocks", "last_step", compiled=True)
        torch.backends.cudnn.benchmark = True
        measure("bf16, last-step commit, compiled blocks, cuDNN-autotuned decoder", "last_step", compiled=True)
        torch._dynamo.reset()
        state = tc.quantize(model, tc.W8A8("fp8", attention=True))
        measure("FP8 linears + FP8 attention, last-step commit, compiled blocks, cuDNN-autotuned decoder", "last_step",
                lambda: state.stats()["attention_fp8_calls"], compiled=True)

    if args.compile:
        measure("bf16, last-step commit", "last_step")
        measure_compiled()
        return
    if not args.only_long:
        measure("bf16, re-encode commit", "reencode")
        measure("bf16, last-step commit", "last_step")
    def profile(key: str) -> None:
        if args.profile and device.type == "cuda":
            result[key] = kernel_profile(model, text, kv.SlidingWindow(frames=args.window, commit="last_step"), latent,
                                         args.steps, 3, device)
            save()

    profile("kernels_bf16_last_step")
    checkpoints = (100, args.long_chunks) if args.long_chunks > 100 else (args.long_chunks,)
    result["long_stream"] = long_stream(model, text, kv.SlidingWindow(frames=args.window, commit="last_step"), latent,
                                        args.steps, args.long_chunks, device, checkpoints, args.long_seconds)
    print("long stream", json.dumps(result["long_stream"]), flush=True)
    save()
    if args.only_long:
        return
    mode = with_fp8_attention(model)
    measure("FP8 attention, last-step commit", "last_step", lambda: mode.fp8_calls)
    profile("kernels_fp8_attention_last_step")
    for module in attention_modules(find_blocks(model)):
        remove_hook(module, QUANT)
    state = tc.quantize(model, tc.W8A8("fp8", attention=True))
    measure("FP8 linears + FP8 attention, last-step commit", "last_step", lambda: state.stats()["attention_fp8_calls"])
    profile("kernels_fp8_linears_attention_last_step")


if __name__ == "__main__":
    main()
