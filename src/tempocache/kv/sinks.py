"""Attention sinks + a window (StreamingLLM, Xiao et al. 2024; LongLive, Yang et al. 2025): the stream's first
`sink_frames` frames are held for good, the most recent `frames - sink_frames` after them; positions are re-indexed
within the cache, sinks first."""

from __future__ import annotations

from dataclasses import dataclass

from .config import check_frames
from .window import SlidingWindow


@dataclass(frozen=True)
class Sinks(SlidingWindow):
    """frames: committed frames held in all, sinks included; sink_frames: the first frames, never evicted."""

    sink_frames: int = 3

    def check(self, chunk_frames: int) -> None:
        super().check(chunk_frames)
        check_frames("sink_frames", self.sink_frames)
        if self.frames - self.sink_frames < chunk_frames:
            raise ValueError(f"{self.sink_frames} sink frames leave {self.frames - self.sink_frames} of the window's "
                             f"{self.frames} for recent frames, fewer than one chunk of {chunk_frames}: use "
                             f"frames >= sink_frames + {chunk_frames}")

    def evict(self, held: list[int], chunk_frames: int, attention: dict[int, float] | None = None) -> list[int]:
        return held[self.sink_frames:][:self.overflow(held, chunk_frames)]
