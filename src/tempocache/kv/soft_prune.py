"""Soft pruning (the FlowCache-inspired soft-prune INT4 of "KV Cache Quantization for Self-Forcing Video Generation:
A 33-Method Empirical Study", 2026, its best operating point): quantize what matters, summarize the rest.

A window whose newest `recent_frames` frames are exact (KIVI's choice; the study quantizes them
too). Of the older frames, the `kept_frames` that score highest stay in `bits` bits; every other
is pruned softly: held as one mean token per head standing for all its tokens (`merged.py`),
where the study repeats a pooled token across the pruned chunk. A frame's score is the study's:
`novelty` times how much its keys' and values' mean magnitude per head differs from the frame
before it (relative L1, averaged over layers) plus `recency` times its place in the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .config import check_frames
from .merged import MergedFrame, Summary
from .quantized import BITS
from .window import CompactWindow

if TYPE_CHECKING:
    from .cache import KVCache


@dataclass(frozen=True)
class SoftPrune(CompactWindow):
    """frames: committed frames held; recent_frames: the newest, exact; kept_frames: older frames held in `bits` bits,
    the rest as their summaries; novelty, recency: the weights of a frame's score."""

    frames: int = 28
    kept_frames: int = 8
    bits: int = 4
    novelty: float = 0.7
    recency: float = 0.3

    def check(self, chunk_frames: int) -> None:
        super().check(chunk_frames)
        check_frames("kept_frames", self.kept_frames, least=0)
        if self.recent_frames + self.kept_frames > self.frames:
            raise ValueError(f"recent_frames + kept_frames ({self.recent_frames + self.kept_frames}) cannot exceed "
                             f"frames ({self.frames})")
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        for name in ("novelty", "recency"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a weight of at least 0, got {getattr(self, name)!r}")

    def precision(self, cache: KVCache, frames: list[int]) -> dict[int, list]:
        older = frames[:max(0, len(frames) - self.recent_frames)]
        summarized = {f for f in older if isinstance(cache.layers[0].compact.get(f), MergedFrame)}
        candidates = [f for f in older if f not in summarized and f < cache.frames_made]
        if not candidates:
            return {}
        score = {f: self.novelty * n + self.recency * (frames.index(f) / max(1, len(frames) - 1))
                 for f, n in zip(candidates, _novelty(cache, candidates))}
        kept = set(sorted(candidates, key=lambda f: (-score[f], -f))[:self.kept_frames])
        layers = len(cache.layers)
        return {f: [self.bits] * layers if f in kept else [Summary()] * layers for f in candidates}


def _novelty(cache: KVCache, frames: list[int]) -> list[float]:
    """Per frame: the relative L1 change of its keys' and values' mean magnitude per head from the frame before it
    (the first: 1), averaged over layers."""
    change = torch.zeros(len(frames))
    for layer in cache.layers:
        profiles = []
        for f in frames:
            if f in cache.slot_of:
                rows = slice(cache.slot_of[f] * cache.layout.tokens, (cache.slot_of[f] + 1) * cache.layout.tokens)
                key, value = layer.keys[:, rows].float(), layer.values[:, rows].float()
            else:
                key, value = layer.compact[f].keys(torch.float32), layer.compact[f].values(torch.float32)
            profiles.append((key.abs().mean((0, 1, 3)) + value.abs().mean((0, 1, 3))).cpu())  # (heads,)
        profiles = torch.stack(profiles)
        relative = (profiles[1:] - profiles[:-1]).abs().mean(-1) / profiles[:-1].abs().mean(-1).clamp(min=1e-6)
        change += torch.cat([torch.ones(1), relative])
    return (change / len(cache.layers)).tolist()
