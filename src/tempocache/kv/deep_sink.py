"""Deep Sink (Deep Forcing, Yi et al. 2025): half of the window held for good as sinks.

StreamingLLM-style sinks of a frame or three let a long video stagnate; Deep Forcing gives
them about half of the window, and re-aligns their temporal RoPE phase to the current
timeline. Here every policy reads positions by rank (`rope.py`), so the sinks always sit
just before the recent frames: that re-alignment is what they get.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sinks import Sinks


@dataclass(frozen=True)
class DeepSink(Sinks):
    """frames: committed frames held in all; sink_share: the share of them that are the stream's first frames."""

    sink_share: float = 0.5
    sink_frames: int = field(init=False, default=0)

    def __post_init__(self):
        if isinstance(self.sink_share, (int, float)) and isinstance(self.frames, int):
            object.__setattr__(self, "sink_frames", max(1, round(self.frames * self.sink_share)))

    def check(self, chunk_frames: int) -> None:
        share = self.sink_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
            raise ValueError(f"sink_share must be between 0 and 1, got {self.sink_share!r}")
        super().check(chunk_frames)
