"""`tempocache stream-bench`: every KV policy and the no-cache baseline on the same captions and seeds, one process.

Methods: full KV (the reference); recomputing the history with each chunk (what a
pipeline without a KV cache does; SkyReels-V2's diffusers pipeline re-runs its overlap
history); Self-Forcing's sliding window; StreamingLLM / LongLive sinks; Deep Forcing's deep
sink; participative eviction (H2O, by frame); KIVI-quantized windows. The model class has no KV cache of its own in diffusers
(`SkyReelsV2DiffusionForcingPipeline` recomputes), so there is no diffusers cache to drive.
transformers' `QuantizedCache` is not driven: it appends tokens to one growing sequence per
layer and can evict nothing, where a video window evicts whole frames (from the middle,
with sinks), and its backends (optimum-quanto, HQQ) are separate installs.
Writes results.json, table.md, memory.png, accuracy.png, and index.html with each
method's video of the first caption beside full KV's.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .. import kv  # noqa: E402
from ..video import MP4Writer  # noqa: E402
from .stream_quality import evaluate_stream  # noqa: E402


def default_methods(window: int) -> dict[str, kv.KVConfig]:
    """The methods beside full KV, all holding at most `window` frames."""
    return {
        f"recompute history ({window} frames)": kv.Recompute(frames=window),
        f"Self-Forcing window ({window})": kv.SlidingWindow(frames=window),
        f"StreamingLLM sinks (3 + {window - 3})": kv.Sinks(frames=window, sink_frames=3),
        f"tempocache DeepSink ({window})": kv.DeepSink(frames=window),
        f"tempocache participative ({window})": kv.Participative(frames=window),
        f"tempocache window ({window}), int8": kv.SlidingWindow(frames=window, quant=kv.KVQuant(bits=8)),
        f"tempocache window ({window}), int4": kv.SlidingWindow(frames=window, quant=kv.KVQuant(bits=4)),
    }


def run_stream_bench(pipe, out: Path, window: int = 28, captions: int = 16, frames: int = 512, every: int = 32,
                     steps: int | None = None, guidance: float | None = None, device: str = "cpu",
                     timing_chunks: int = 8) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate_stream(pipe, default_methods(window), captions, frames, every, steps, guidance, device=device,
                             timing_chunks=timing_chunks, keep_samples=1)
    samples = result.pop("samples")
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(table(result))
    plot(result, out)
    videos = out / "videos"
    videos.mkdir(exist_ok=True)
    for i, (name, clips) in enumerate(samples.items()):
        with MP4Writer(videos / f"{i}.mp4") as writer:
            writer.write(clips[0])
    page = ["<html><body><h1>stream-bench</h1>", f"<p>{html.escape(result['model'])}: {result['captions']} held-out "
            f"captions, {result['frames']} frames; first caption below</p><table>"]
    for i, name in enumerate(samples):
        page.append(f"<tr><td>{html.escape(name)}</td><td><video src='videos/{i}.mp4' autoplay loop muted></video></td>"
                    f"<td><video src='videos/0.mp4' autoplay loop muted></video></td></tr>")
    (out / "index.html").write_text("\n".join(page + ["</table></body></html>"]))
    return result


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
