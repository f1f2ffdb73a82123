"""A figure of held-out ShapesWorld edits: source, target and edit mask, one row per kind.

    python scripts/edit_examples.py docs/images/edits.png
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tempocache.reference.edits import KINDS, held_out_edits, render_edit  # noqa: E402


def main(out: str) -> None:
    figure, axes = plt.subplots(len(KINDS), 3, figsize=(6, 2 * len(KINDS)))
    for row, edit in zip(axes, held_out_edits(len(KINDS))):
        source, target, mask = render_edit(edit)
        for ax, image, title in zip(row, (source.permute(1, 2, 0), target.permute(1, 2, 0), mask),
                                    (edit.source.caption(False), edit.instruction, "edit mask")):
            ax.imshow(image, cmap="gray" if image.dim() == 2 else None, interpolation="nearest")
            ax.set_title(title, fontsize=6)
            ax.axis("off")
    figure.tight_layout()
    figure.savefig(out, dpi=150)


if __name__ == "__main__":
    main(sys.argv[1])
