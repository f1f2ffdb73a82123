"""Temporal merging (TempCache, "Fast Autoregressive Video Diffusion and World Models with Temporal Cache Compression
and Sparse Attention", 2026): most of a video's tokens repeat the same place of the frame before.

A window whose newest `recent_frames` frames are exact; as a frame leaves them, each layer
merges its tokens into the same place of the next frame, all but the `keep` share least like it
(keys compared by cosine, before the temporal rotation), keys and values averaged by how many
tokens each stands for, and a merged token's logit raised by the log of that count
(`merged.py`). A static background so ends up as one token per place in the newest merged
frame, standing for every frame of the window; moving objects keep their own tokens. The
paper finds correspondences by approximate nearest neighbours; here the correspondence is the
same place, which keeps each frame's held tokens a fixed number and the budget exact. For
exact duplicates (keys equal after rotation) merging changes nothing; otherwise a merged token
is read at its newest frame's position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .merged import TemporalMerge
from .window import TokenShareWindow

if TYPE_CHECKING:
    from .cache import KVCache


@dataclass(frozen=True)
class TempCache(TokenShareWindow):
    """frames: committed frames held; recent_frames: the newest, exact; keep: the share of an older frame's tokens
    held as they are, the rest merged into the next frame."""

    frames: int = 28

    def precision(self, cache: KVCache, frames: list[int]) -> dict[int, list]:
        older = frames[:max(0, len(frames) - self.recent_frames)]
        merge = [TemporalMerge(self.kept_tokens(cache.layout.tokens))] * len(cache.layers)
        return {f: merge for f in older if f in cache.slot_of}
