"""`tempocache stream-bench`: every KV policy and the no-cache baseline on the same captions and seeds, one process.

Methods: full KV (the reference); recomputing the history with each chunk (what a
pipeline without a KV cache does; SkyReels-V2's diffusers pipeline re-runs its overlap
history); Self-Forcing's sliding window; StreamingLLM / LongLive sinks; Deep Forcing's deep
sink; participative eviction (H2O, by frame); KIVI-quantized windows; our `kv.Auto`; a window with the
step cache on the chunk denoiser; TempCache merging, soft-prune INT4, `kv.Auto` with summaries and
heavy hitters (H2O, by token) at each budget. The bounded methods run at two memory budgets (the KV of
`budgets` frames kept exact); a quantized window holds as many frames as fit in its budget, up to
the trained context. The model class has no KV cache of its own in diffusers
(`SkyReelsV2DiffusionForcingPipeline` recomputes), so there is no diffusers cache to drive.
transformers' `QuantizedCache` is not driven: it appends tokens to one growing sequence per
layer and can evict nothing, where a video window evicts whole frames (from the middle,
with sinks), and its backends (optimum-quanto, HQQ) are separate installs.
Writes results.json, samples.npz, table.md, memory.png, accuracy.png, and index.html with each
method's video of the first caption beside full KV's.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import tempocache  # noqa: E402

from .. import kv  # noqa: E402
from ..kv.merged import merged_bytes  # noqa: E402
from ..kv.quantized import exact_bytes, quantized_bytes  # noqa: E402
from .stream_quality import Method, evaluate_stream  # noqa: E402


def _frame_bytes(pipe) -> tuple[int, int, int, int]:
    """Tokens, heads, head_dim and bytes per element of one frame's keys and values at one layer (batch 1)."""
    config, patch = pipe.transformer.config, pipe.transformer.config.patch_size
    tokens = (pipe.spec.size // patch[1]) * (pipe.spec.size // patch[2])
    return tokens, config.num_attention_heads, config.attention_head_dim, pipe.transformer.dtype.itemsize


def frames_within(pipe, budget: int, quant: kv.KVQuant, most: int) -> int:
    """The frames a window quantized as `quant` holds in the KV memory of `budget` exact frames (at most `most`)."""
    tokens, heads, head_dim, itemsize = _frame_bytes(pipe)
    exact = exact_bytes(1, tokens, heads, head_dim, itemsize)
    quantized = quantized_bytes(1, tokens, heads, head_dim, quant.bits)
    recent = max(quant.recent_frames, pipe.spec.chunk_frames)
    return min(most, recent + (budget - recent) * exact // quantized)


def merging_within(pipe, budget: int, frames: int, recent: int) -> kv.TempCache:
    """A TempCache of `frames` frames keeping as many tokens per merged frame as the KV memory of `budget` exact
    frames allows (its newest merged frame holds every place)."""
    tokens, heads, head_dim, itemsize = _frame_bytes(pipe)
    left = budget * exact_bytes(1, tokens, heads, head_dim, itemsize) - recent * exact_bytes(
        1, tokens, heads, head_dim, itemsize) - merged_bytes(1, tokens, heads, head_dim, itemsize)
    kept = max(1, min(tokens, left // ((frames - recent - 1) * merged_bytes(1, 1, heads, head_dim, itemsize))))
    return kv.TempCache(frames=frames, recent_frames=recent, keep=kept / tokens)


def hitters_within(pipe, budget: int, frames: int, recent: int) -> kv.HeavyHitters:
    """A HeavyHitters of `frames` frames keeping as many tokens per older frame as the KV memory of `budget` exact
    frames allows."""
    tokens, heads, head_dim, itemsize = _frame_bytes(pipe)
    left = (budget - recent) * exact_bytes(1, tokens, heads, head_dim, itemsize)
    kept = max(1, min(tokens, left // ((frames - recent) * merged_bytes(1, 1, heads, head_dim, itemsize))))
    return kv.HeavyHitters(frames=frames, recent_frames=recent, keep=kept / tokens)


def pruning_within(pipe, budget: int, frames: int, recent: int, bits: int = 4) -> kv.SoftPrune:
    """A SoftPrune of `frames` frames keeping as many older frames in `bits` bits as the KV memory of `budget` exact
    frames allows, the others as summaries."""
    tokens, heads, head_dim, itemsize = _frame_bytes(pipe)
    left = (budget - recent) * exact_bytes(1, tokens, heads, head_dim, itemsize)
    summaries = (frames - recent) * merged_bytes(1, 1, heads, head_dim, itemsize)
    kept = (left - summaries) // (quantized_bytes(1, tokens, heads, head_dim, bits)
                                  - merged_bytes(1, 1, heads, head_dim, itemsize))
    return kv.SoftPrune(frames=frames, recent_frames=recent, kept_frames=min(frames - recent, kept), bits=bits)


def default_methods(pipe, context: int, budgets: tuple[int, int]) -> dict[str, kv.KVConfig | Method]:
    """The methods beside full KV, most telling first: each bounded one at the KV memory of `budgets` exact frames,
    the peers also at `context` (the most frames the model was trained to attend to)."""
    methods = {f"Self-Forcing window ({context})": kv.SlidingWindow(frames=context)}
    for budget in budgets:
        methods |= {
            f"Self-Forcing window ({budget})": kv.SlidingWindow(frames=budget),
            f"StreamingLLM sinks (3 + {budget - 3})": kv.Sinks(frames=budget, sink_frames=3),
            f"tempocache Auto ({budget} frames' memory)": kv.Auto(frames=context, memory_frames=budget),
        }
        for bits in (8, 4):
            quant = kv.KVQuant(bits=bits)
            held = frames_within(pipe, budget, quant, context)
            methods[f"tempocache window ({held}), int{bits}, {budget} frames' memory"] = kv.SlidingWindow(
                frames=held, quant=quant)
        methods[f"tempocache participative ({budget})"] = kv.Participative(frames=budget)
        methods[f"tempocache DeepSink ({budget})"] = kv.DeepSink(frames=budget)
    step_cache = tempocache.Auto(budget=0.5, zero_shot=True)
    methods |= {
        f"Self-Forcing window ({context}) + step cache Auto(0.5)": Method(kv.SlidingWindow(frames=context), step_cache),
        f"StreamingLLM sinks (3 + {context - 3})": kv.Sinks(frames=context, sink_frames=3),
        f"recompute history ({context} frames)": kv.Recompute(frames=context),
    }
    recent = pipe.spec.chunk_frames
    for budget in budgets:  # after the rest, so that the earlier methods keep their numbers for `methods`
        merging, pruning = merging_within(pipe, budget, context, recent), pruning_within(pipe, budget, context, recent)
        methods[f"TempCache merging ({context}, {merging.keep:.0%} kept), {budget} frames' memory"] = merging
        methods[f"soft-prune int4 ({context}, {pruning.kept_frames} in int4), {budget} frames' memory"] = pruning
        methods[f"tempocache Auto + summaries ({budget} frames' memory)"] = kv.Auto(
            frames=context, memory_frames=budget, summaries=True)
        hitters = hitters_within(pipe, budget, context, recent)
        methods[f"heavy hitters ({context}, {hitters.keep:.0%} kept), {budget} frames' memory"] = hitters
    return methods


def run_stream_bench(pipe, out: Path, context: int = 28, budgets: tuple[int, int] = (8, 16), captions: int = 16,
                     frames: int = 512, every: int = 32, steps: int | None = None, guidance: float | None = None,
                     device: str = "cpu", timing_chunks: int = 8, methods: Sequence[slice] = (slice(None),),
                     videos: bool = True, full_kv: bool = True) -> dict:
    """`methods`: which of `default_methods` to run beside full KV (slices of it, in the order given: a long bench can
    be split over runs;
    `full_kv=False` leaves full KV out, and with it the PSNR against it).
    results.json and samples.npz (each method's clip of the first caption) are rewritten after each method, so a run
    cut short keeps what it finished; `write_report` then makes the rest from them (`videos=False`: all but the
    videos, which need imageio-ffmpeg)."""
    out.mkdir(parents=True, exist_ok=True)
    listed = list(default_methods(pipe, context, budgets).items())
    chosen = dict(item for part in methods for item in listed[part])

    def save(result: dict) -> None:
        (out / "results.json").write_text(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
        clips = [(clips[0] * 255).round().astype(np.uint8) for clips in result["samples"].values()]
        np.savez_compressed(out / "samples.npz", *clips)
        print(f"{list(result['policies'])[-1]}: {list(result['policies'].values())[-1]['seconds']} s", flush=True)

    result = evaluate_stream(pipe, chosen, captions, frames, every, steps, guidance, device=device,
                             full_kv=full_kv, timing_chunks=timing_chunks, keep_samples=1, progress=save)
    result.pop("samples")
    write_report(out, videos)
    return result


def write_report(out: Path, videos: bool = True) -> None:
    """table.md, memory.png, accuracy.png and, with `videos`, index.html with each method's video of the first caption
    beside full KV's, from the results.json and samples.npz of a run in `out`."""
    result = json.loads((out / "results.json").read_text())
    (out / "table.md").write_text(table(result))
    plot(result, out)
    if not videos:
        return
    from ..video import MP4Writer

    (out / "videos").mkdir(exist_ok=True)
    with np.load(out / "samples.npz") as samples:
        for i in range(len(result["policies"])):
            with MP4Writer(out / "videos" / f"{i}.mp4") as writer:
                writer.write(samples[f"arr_{i}"] / 255.0)
    page = ["<html><body><h1>stream-bench</h1>", f"<p>{html.escape(result['model'])}: {result['captions']} held-out "
            f"captions, {result['frames']} frames; first caption below, {html.escape(next(iter(result['policies'])))} "
            "(the first method) on the right</p><table>"]
    for i, name in enumerate(result["policies"]):
        page.append(f"<tr><td>{html.escape(name)}</td><td><video src='videos/{i}.mp4' autoplay loop muted></video></td>"
                    f"<td><video src='videos/0.mp4' autoplay loop muted></video></td></tr>")
    (out / "index.html").write_text("\n".join(page + ["</table></body></html>"]))


def table(result: dict) -> str:
    starts, last = result["starts"], result["starts"][-1]
    lines = ["| method | fps | first frame (s) | KV at the end (MB) | all-attribute accuracy, first / last window | "
             f"Fréchet at frame {last} | PSNR vs full KV at frame {last} |", "|---|---|---|---|---|---|---|"]
    for name, row in result["policies"].items():
        accuracy = f"{row['accuracy'][0]['all']:.2f} / {row['accuracy'][-1]['all']:.2f}"
        psnr = f"{row['psnr_vs_full_kv'][-1]:.1f}" if "psnr_vs_full_kv" in row else "-"
        kv_end = list(row["kv_bytes"].values())[-1] / 1e6
        lines.append(f"| {name} | {row['timing']['fps']:.1f} | {row['timing']['time_to_first_frame_s']:.2f} | "
                     f"{kv_end:.1f} | {accuracy} | {row['frechet'][-1]:.0f} | {psnr} |")
    lines.append(f"\nWindows of 8 frames read every {result['every']} frames from frame {starts[0]} to {last}; "
                 f"Fréchet real vs real at frame {last}: {result['frechet_real_vs_real'][-1]:.0f}.")
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> None:
    for name, ylabel, values in (("memory", "KV bytes held (MB)", lambda r: [b / 1e6 for b in r["kv_bytes"].values()]),
                                 ("accuracy", "all-attribute accuracy", lambda r: [a["all"] for a in r["accuracy"]])):
        fig, ax = plt.subplots(figsize=(7, 4))
        for method, row in result["policies"].items():
            x = [int(f) for f in row["kv_bytes"]] if name == "memory" else result["starts"]
            ax.plot(x, values(row), marker=".", label=method)
        ax.set_xlabel("frames made" if name == "memory" else "window start (frame)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
