"""A condensed memory of older frames, in the spirit of VideoStreaming (Qian et al., 2024, "Streaming Long Video
Understanding with Large Language Models"), which condenses each clip into a few memory tokens: here without
training, on the keys and values themselves. Sinks and a window of recent frames stay exact; a frame leaving the
window is condensed to `tokens` tokens (the mean keys and values of groups of its tokens), each attended to with
the logit of its group's size added (TempCache's multiplicity correction: exact when a group's tokens are alike).
The newest `condensed_frames` condensed frames are kept (None: all of them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kv import Sinks
from ..kv.config import check_frames


@dataclass(frozen=True)
class Condensed(Sinks):
    """frames, sink_frames: the exact frames on the device, as `kv.Sinks`; tokens: what a frame leaving them is
    condensed to; condensed_frames: how many condensed frames are kept (None: every one)."""

    tokens: int = 1
    condensed_frames: int | None = None

    def check(self, chunk_frames: int) -> None:
        super().check(chunk_frames)
        check_frames("tokens", self.tokens)
        if self.condensed_frames is not None:
            check_frames("condensed_frames", self.condensed_frames)

    def check_tokens(self, frame_tokens: int) -> None:
        if frame_tokens % self.tokens:
            raise ValueError(f"a frame of {frame_tokens} tokens cannot be condensed to {self.tokens}: use a divisor "
                             f"of {frame_tokens}")


def condense(keys: torch.Tensor, values: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A frame's keys and values (1, kv_heads, frame tokens, head_dim) as `tokens` group means, and the logit bias
    each condensed token takes: log of its group's size."""
    group = keys.shape[2] // tokens
    pooled = [t.unflatten(2, (tokens, group)).mean(3) for t in (keys, values)]
    return pooled[0], pooled[1], math.log(group)
