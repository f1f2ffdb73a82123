"""Sliding window (Self-Forcing, Huang et al. 2025): hold the most recent `frames` frames, drop the oldest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import KVConfig, check_frames

if TYPE_CHECKING:
    from .cache import KVCache


@dataclass(frozen=True)
class SlidingWindow(KVConfig):
    """frames: committed frames held (the chunk being made attends to these and to itself)."""

    frames: int = 12

    def check(self, chunk_frames: int) -> None:
        super().check(chunk_frames)
        check_frames("frames", self.frames)
        if self.frames < chunk_frames:
            raise ValueError(f"a window of {self.frames} frames cannot hold one chunk of {chunk_frames}: "
                             f"use frames >= {chunk_frames}")

    def capacity(self, chunk_frames: int) -> int:
        return self.frames

    def overflow(self, held: list[int], chunk_frames: int) -> int:
        """How many frames must go for a chunk to fit."""
        return max(len(held) + chunk_frames - self.frames, 0)

    def evict(self, held: list[int], chunk_frames: int, attention: dict[int, float] | None = None) -> list[int]:
        return held[:self.overflow(held, chunk_frames)]


@dataclass(frozen=True)
class CompactWindow(SlidingWindow):
    """A window whose newest `recent_frames` frames are exact and the older ones held compact, as a subclass's
    `precision` says (`TempCache`, `SoftPrune`, `HeavyHitters`)."""

    recent_frames: int = 4

    def check(self, chunk_frames: int) -> None:
        super().check(chunk_frames)
        check_frames("recent_frames", self.recent_frames, least=0)
        if self.recent_frames > self.frames:
            raise ValueError(f"recent_frames ({self.recent_frames}) cannot exceed frames ({self.frames})")
        if self.quant is not None:
            raise ValueError(f"{type(self).__name__} holds its older frames its own way: leave quant None")

    def compacts(self) -> bool:
        return True

    def exact_capacity(self, cache: KVCache) -> int:
        return min(self.frames, max(self.recent_frames, cache.layout.chunk_frames))


@dataclass(frozen=True)
class TokenShareWindow(CompactWindow):
    """A compact window holding the `keep` share of each older frame's tokens (`TempCache`, `HeavyHitters`)."""

    keep: float = 0.25

    def check(self, chunk_frames: int) -> None:
        super().check(chunk_frames)
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ValueError(f"keep must be a share of a frame's tokens in (0, 1], got {self.keep!r}")

    def kept_tokens(self, tokens: int) -> int:
        return max(1, round(self.keep * tokens))
