"""diffusers' context parallelism (`enable_parallelism(config=ContextParallelConfig(...))`) as tempocache sees it.

Under Ulysses or Ring attention every rank runs the whole model on its shard of the sequence,
so a cache holds its rank's shard, and a decision signal computed on a shard (a residual's
relative change) differs from rank to rank. Ranks that decided differently would skip different
blocks and wait on each other's collectives forever: every signal is summed over the ranks of
the generation before it decides anything, so that each rank decides on the whole sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def context_parallel_config(transformer: nn.Module):
    """diffusers' `ContextParallelConfig` the transformer runs under, or None."""
    return getattr(getattr(transformer, "_parallel_config", None), "context_parallel_config", None)


def decision_group(transformer: nn.Module) -> dist.ProcessGroup | None:
    """The ranks a context-parallel transformer's generation is split over (None: it is not split)."""
    mesh = getattr(context_parallel_config(transformer), "_flattened_mesh", None)
    return None if mesh is None or mesh.size() == 1 else mesh.get_group()


def check_parallel(transformer: nn.Module) -> None:
    """Raise ValueError, before any compute, for a split diffusers' Ulysses attention cannot make: it hands each
    rank a share of the attention heads, so their count must divide by the Ulysses degree (or ulysses_anything)."""
    config = context_parallel_config(transformer)
    heads = getattr(getattr(transformer, "config", None), "num_attention_heads", None)
    if config is None or heads is None or config.ulysses_anything or heads % config.ulysses_degree == 0:
        return
    divisors = [d for d in range(2, heads + 1) if heads % d == 0]
    raise ValueError(f"Ulysses attention over {config.ulysses_degree} ranks gives each rank a share of the attention "
                     f"heads: {type(transformer).__name__} has {heads}, which {config.ulysses_degree} does not divide; "
                     f"use a ulysses_degree of {' or '.join(map(str, divisors)) or '1 (ring_degree instead)'}, "
                     f"ring attention, or ContextParallelConfig(ulysses_anything=True)")


def refuse_context_parallel(transformer: nn.Module, part: str, instead: str) -> None:
    """Raise NotImplementedError if `transformer` is split by diffusers' context parallelism, for a tempocache `part`
    that attends with attention of its own (no part in diffusers' exchange between ranks: each rank would attend
    only to its shard, a silently wrong result); `instead`: what to do."""
    if context_parallel_config(transformer) is not None:
        raise NotImplementedError(f"{part} attends with attention of its own, which takes no part in diffusers' "
                                  f"context parallelism (each rank would attend only to its shard): {instead}, "
                                  f"without transformer.enable_parallelism")


def summed(partial: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`partial` (sums over this rank's shard) summed over `group`'s ranks, in float64 so that every rank, and one
    unsplit process, adds up nearly the same number."""
    total = partial.double()
    if group is not None:
        dist.all_reduce(total, group=group)
    return total
