"""Participative eviction (H2O, Zhang et al. 2023; Deep Forcing's participative compression, Yi et al. 2025), by frame.

Keep what recent queries attend to: every call, a sample of the chunk's queries scores the
held frames by the attention mass they receive (averaged over layers, heads and the
batch, decayed at each commit); when the window is full, the frames evicted are those
that received least, the newest `recent_frames` always kept. Deep Forcing and H2O keep
individual tokens (`heavy_hitters.py`); here whole frames are kept or dropped, so the ring
buffer of frames holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import check_frames, check_scoring
from .window import SlidingWindow


@dataclass(frozen=True)
class Participative(SlidingWindow):
    """frames: committed frames held; recent_frames: the newest, never evicted; query_sample: queries per call
    that score the frames; decay: how much of a frame's score is left after each commit."""

    recent_frames: int = 4
    query_sample: int = 64
    decay: float = 0.5
    scores_attention = True  # the cache measures the attention mass each held frame receives

    def check(self, chunk_frames: int) -> None:
        super().check(chunk_frames)
        check_frames("recent_frames", self.recent_frames, least=0)
        check_scoring(self.query_sample, self.decay)
        if self.recent_frames > self.frames:
            raise ValueError(f"recent_frames ({self.recent_frames}) cannot exceed frames ({self.frames})")

    def evict(self, held: list[int], chunk_frames: int, attention: dict[int, float] | None = None) -> list[int]:
        over = self.overflow(held, chunk_frames)
        if not over:
            return []
        protected = max(self.recent_frames - chunk_frames, 0)
        candidates = held[:len(held) - protected]
        ranked = sorted(candidates, key=lambda f: ((attention or {}).get(f, 0.0), f))  # least attended, then oldest
        return sorted(ranked[:over])
