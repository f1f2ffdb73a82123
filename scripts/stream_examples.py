"""A ShapesStream's first events, the frame each one first shows, and questions asked about them.

    python scripts/stream_examples.py docs/images/shapes_stream.png
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tempocache.reference.shapes_stream import ShapesStream  # noqa: E402

EVENTS = 8


def label(event) -> str:
    if event.kind == "recolour":
        return f"{event.shape}: {event.before} to {event.after}"
    if event.kind == "background":
        return f"background: {event.before} to {event.after}"
    if event.kind in ("enter", "leave"):
        return f"{event.shape} {'enters' if event.kind == 'enter' else 'leaves'} ({event.before})"
    return f"{event.shape} {'starts' if event.kind == 'start' else 'stops'} moving"


def main(path: str) -> None:
    stream = ShapesStream(seed=2, frames=1024)
    events = stream.events[:EVENTS]
    fig, axes = plt.subplots(1, EVENTS, figsize=(1.7 * EVENTS, 2.9))
    for ax, event in zip(axes, events):
        ax.imshow(stream.render(event.frame, event.frame + 1)[0].permute(1, 2, 0), interpolation="nearest")
        ax.set_title(f"frame {event.frame}\n{label(event)}", fontsize=7)
        ax.axis("off")
    asked = [q for q in stream.questions(40) if q.evidence <= events[-1].frame][:4]
    text = "\n".join(f"asked after frame {q.asked}: {q.text}? {q.answer} (evidence at frame {q.evidence}, "
                     f"{dict(far='far beyond').get(q.bucket(), q.bucket())} the 64-frame window)" for q in asked)
    fig.text(0.01, 0.02, text, fontsize=7, family="monospace", va="bottom")
    fig.tight_layout(rect=(0, 0.2, 1, 0.95))
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1])
