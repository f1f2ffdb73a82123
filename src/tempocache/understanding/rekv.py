"""ReKV (Di et al., 2025, "Streaming Video Question-Answering with In-context Video KV-Cache Retrieval"): sinks and
a window of recent frames stay on the device; every older frame's keys and values move to host memory, one block a
frame, with one representative key each (the mean of its keys). A question's queries, layer by layer, score the
blocks by their representative keys; the `top_k` best of each layer come back, in time order, for that question
alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kv import Sinks
from ..kv.config import check_frames


@dataclass(frozen=True)
class ReKV(Sinks):
    """frames: frames held on the device, sinks included; sink_frames: the first frames, never moved; top_k: frames
    brought back per layer for a question (random_retrieval: at random, the baseline); quant: `kv.KVQuant(bits=8, 4 or 2)` stores the host frames so (its
    recent_frames does not apply: the device frames are all exact), None as they are."""

    top_k: int = 8
    random_retrieval: bool = False  # the baseline: any top_k host frames, whatever the question

    def check(self, chunk_frames: int) -> None:
        super().check(chunk_frames)
        check_frames("top_k", self.top_k)


def block_scores(queries: torch.Tensor, representatives: torch.Tensor) -> torch.Tensor:
    """(blocks,) each block's score for one layer: the question's rotated queries (heads, tokens, head_dim) against
    the blocks' representative keys (blocks, kv_heads, head_dim), query heads grouped onto their key-value heads,
    averaged over heads and tokens."""
    heads, kv_heads = queries.shape[0], representatives.shape[1]
    grouped = queries.float().unflatten(0, (kv_heads, heads // kv_heads))  # (kv_heads, group, tokens, head_dim)
    return torch.einsum("hgtd,bhd->b", grouped, representatives.float()) / (heads * queries.shape[1])


def retrieve(scores: torch.Tensor, frames: list[int], top_k: int) -> list[int]:
    """The `top_k` frames of the best scores, in time order."""
    best = scores.topk(min(top_k, len(frames))).indices.tolist()
    return sorted(frames[i] for i in best)
