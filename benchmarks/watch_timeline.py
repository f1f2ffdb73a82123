"""A held-out ShapesStream watched under ReKV, drawn as a timeline: which frames each question brought back.

The top row is the stream itself, a frame at each of its events (a few frames into an entry, a few before an
exit). Each question below is a row:
the frames on the device when it was asked (the sinks and the window, grey), the host frames
it retrieved (dots, darker where more layers retrieved them), its evidence frame (star) and the
frame it was asked at (bar), with its answer and the true one.

    python benchmarks/watch_timeline.py --weights src/tempocache/reference/weights/shapes-vqa \
        --out docs/images/watch_timeline.png
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import LlavaForConditionalGeneration  # noqa: E402

from tempocache.reference import shapes_stream, vqa  # noqa: E402
from tempocache.understanding import ReKV, watch  # noqa: E402


def pick(questions: list[shapes_stream.Question], count: int, window: int) -> list[shapes_stream.Question]:
    """Up to `count` questions, those whose evidence lies beyond the window first, one of each type before repeats."""
    order = sorted(questions, key=lambda q: (q.bucket(window) == "inside", q.asked))
    chosen, kinds = [], Counter()
    for rounds in range(count):
        for q in order:
            if len(chosen) < count and q not in chosen and kinds[q.kind] == rounds:
                chosen.append(q)
                kinds[q.kind] += 1
    return sorted(chosen, key=lambda q: q.asked)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="a folder written by train-vqa")
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--stream", type=int, default=None,
                        help="which of the bench's 32 held-out streams (default: the one with most questions beyond the window)")
    parser.add_argument("--held", type=int, default=16, help="device frames (the sinks among them)")
    parser.add_argument("--top-k", type=int, default=4, help="host frames retrieved per layer")
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    model = LlavaForConditionalGeneration.from_pretrained(args.weights).eval()
    window = model.config.stream_window
    streams = shapes_stream.held_out_questions(32, args.frames)  # as watch-bench draws and balances them
    if args.stream is None:
        stream, asked = max(streams, key=lambda pair: sum(q.bucket(window) != "inside" for q in pair[1]))
    else:
        stream, asked = streams[args.stream]
    chosen = pick(asked, args.questions, window)
    if not chosen:
        raise SystemExit(f"held-out stream {args.stream} has no questions at {args.frames} frames")
    watcher = watch(model, ReKV(frames=args.held, sink_frames=vqa.SINK_FRAMES, top_k=args.top_k))
    rows = []
    for q in chosen:
        watcher.add(stream.render(watcher.frames, q.asked))
        answer = watcher.ask(q.text)
        retrieved = Counter(f for layer in answer.retrieved for f in layer)
        held = sorted(set(answer.frames) - set(retrieved))
        rows.append((q, answer.word, held, retrieved, len(answer.retrieved)))

    fig, axes = plt.subplots(len(rows) + 1, 1, figsize=(11, 1.2 + 0.7 * len(rows)), sharex=True,
                             gridspec_kw={"height_ratios": [1.6] + [1] * len(rows)})
    strip, span = axes[0], args.frames / 24
    for event in stream.events:  # an object shown well inside: after it entered, before it left
        shown = min(max(event.frame + {"enter": 8, "leave": -8}.get(event.kind, 0), 0), args.frames - 1)
        image = stream.render(shown, shown + 1)[0].permute(1, 2, 0).numpy()
        strip.imshow(image, extent=(event.frame, event.frame + span, 0, 1), aspect="auto", interpolation="nearest")
    strip.set_xlim(0, args.frames + span)
    strip.set_ylim(0, 1)
    strip.set_yticks([])
    strip.set_title(f"held-out stream of {args.frames} frames under ReKV ({args.held} frames on the device, "
                    f"top {args.top_k} retrieved per layer)", fontsize=9)
    for ax, (q, word, held, retrieved, layers) in zip(axes[1:], rows):
        ax.scatter(held, [-0.4] * len(held), marker="|", color="0.7", s=60)
        frames = sorted(retrieved)
        ax.scatter(frames, [-0.4] * len(frames), c=[retrieved[f] / layers for f in frames], cmap="Blues", vmin=0,
                   vmax=1, edgecolors="navy", linewidths=0.4, s=22, zorder=3)
        ax.scatter([q.evidence], [-0.4], marker="*", color="crimson", s=70, zorder=4)
        ax.axvline(q.asked, color="black", linewidth=1)
        mark = "right" if word == q.answer else f"wrong, truly {q.answer}"
        ax.text(0.003, 0.9, f"{q.text}?  {word} ({mark})", transform=ax.transAxes, fontsize=7, va="top")
        ax.set_yticks([])
        ax.set_ylim(-1, 1)
    axes[-1].set_xlabel("frame (grey: on the device; dots: retrieved, darker by more layers; star: evidence; bar: asked)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}: {sum(w == q.answer for q, w, *_ in rows)} of {len(rows)} answered right")


if __name__ == "__main__":
    main()
