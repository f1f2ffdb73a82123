"""RegionE's partition over held-out edits, one per kind: the image, its edit, the tokens RegionE computed, the
ground-truth mask.

    python scripts/region_examples.py docs/images/regione_partition.png
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import tempocache as tc  # noqa: E402
from tempocache.models import REGION, attached  # noqa: E402
from tempocache.reference.edits import KINDS, held_out_edits, render_edit  # noqa: E402


def main(path: str) -> None:
    pipe = tc.load_pipeline("shapes-edit")
    pipe.set_progress_bar_config(disable=True)
    listed = held_out_edits(len(KINDS), seed=1)
    fig, axes = plt.subplots(len(listed), 4, figsize=(7.6, 1.6 * len(listed)), squeeze=False)
    titles = ("image", "RegionE's edit", "tokens computed", "ground-truth mask")
    with tc.enabled(pipe, tc.RegionE()):
        for row, edit in enumerate(listed):
            source, _, mask = render_edit(edit)
            made = tc.edit(source, edit.instruction, pipe=pipe)
            edited = attached(pipe, REGION).partitions[-1][0].reshape(16, 16)
            fallback = tc.stats(pipe)["global_fallbacks"] > 0
            grid = torch.kron(edited.float(), torch.ones(2, 2))  # each token is a 2x2 pixel patch
            overlay = source.permute(1, 2, 0) * (0.35 + 0.65 * grid[..., None])
            pictures = (source.permute(1, 2, 0), made, overlay, mask.float())
            for col, picture in enumerate(pictures):
                axes[row, col].imshow(picture, interpolation="nearest", cmap="gray" if col == 3 else None)
                axes[row, col].axis("off")
                if row == 0:
                    axes[row, col].set_title(titles[col], fontsize=8)
            label = edit.instruction.replace(" the ", "\nthe ") + ("\n(global: run in full)" if fallback else "")
            axes[row, 0].text(-4, 16, label, ha="right", va="center", fontsize=7)
            tc.reset(pipe)
    fig.suptitle("RegionE() on shapes-edit: held-out edits; unedited tokens dimmed", fontsize=9)
    fig.subplots_adjust(left=0.25, right=0.99, top=0.9, bottom=0.01, wspace=0.05, hspace=0.1)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1])
