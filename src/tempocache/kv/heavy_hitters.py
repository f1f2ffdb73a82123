"""Heavy hitters by token (H2O, Zhang et al. 2023; Deep Forcing's participative compression, Yi et al. 2025): keep
the tokens that recent queries attend to.

A window whose newest `recent_frames` frames are exact. At every call a sample of the chunk's
queries scores each exact frame's tokens, layer by layer, by the attention mass they receive
(averaged over heads, queries and the batch, decayed at each commit). As a frame leaves the
exact ones, each layer holds only the `keep` share of its tokens that received the most, read
at their own places; the rest are dropped. `Participative` keeps or drops whole frames; this
keeps the salient tokens of every frame in the window, a different set in each layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .config import check_scoring
from .merged import KeepTokens
from .window import TokenShareWindow

if TYPE_CHECKING:
    from .cache import KVCache


@dataclass(frozen=True)
class HeavyHitters(TokenShareWindow):
    """frames: committed frames held; recent_frames: the newest, exact; keep: the share of an older frame's tokens
    held, those attended to most; query_sample: queries per call that score them; decay: how much of a token's
    score is left after each commit."""

    frames: int = 28
    query_sample: int = 64
    decay: float = 0.5
    scores_attention = True
    scores_tokens = True  # the attention mass is kept per token of each exact frame, not only per frame

    def check(self, chunk_frames: int) -> None:
        super().check(chunk_frames)
        check_scoring(self.query_sample, self.decay)

    def precision(self, cache: KVCache, frames: list[int]) -> dict[int, list]:
        older = frames[:max(0, len(frames) - self.recent_frames)]
        tokens, batch = cache.layout.tokens, cache.layers[0].pending[0].shape[0]
        kept, plan = self.kept_tokens(tokens), {}
        for frame in (f for f in older if f in cache.slot_of):
            masses = cache.token_attention.get(frame, [None] * len(cache.layers))
            plan[frame] = [KeepTokens(_most_attended(mass, tokens, kept, batch)) for mass in masses]
        return plan


def _most_attended(mass: torch.Tensor | None, tokens: int, kept: int, batch: int) -> torch.Tensor:
    """(batch, kept): the places of the `kept` tokens of highest mass (tokens,), in place order; the first ones if
    the frame was never scored."""
    if mass is None:
        return torch.arange(kept).expand(batch, -1)
    return mass.topk(kept).indices.sort().values.expand(batch, -1)
