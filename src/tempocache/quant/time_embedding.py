"""Exact, cached time embeddings (TFMQ-DM, "Temporal Feature Matters", Huang et al., 2024).

The time embedding is tiny but every block's modulation hangs on it, so it is never
quantized; and a sampler only ever feeds it a finite set of timesteps, so its output is
computed once per distinct input and then looked up. The key is the input's exact bytes
(and the weights' version counters), so a hit returns exactly what computing would.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from diffusers.models.embeddings import TimestepEmbedding
from torch import nn

from ..models import Hook

MAX_ENTRIES = 1024


class TimeEmbeddingCache(Hook):
    def __init__(self):
        super().__init__()
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def new_forward(self, module: nn.Module, sample: torch.Tensor, *args, **kwargs):
        if args or kwargs:  # a conditioning input besides the timestep: nothing finite to key on
            return self.original(sample, *args, **kwargs)
        versions = tuple(p._version for p in module.parameters())
        key = (sample.shape, sample.dtype, sample.device, versions, sample.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        output = self.original(sample)
        self.entries[key] = output.detach()
        if len(self.entries) > MAX_ENTRIES:
            self.entries.popitem(last=False)
        return output


def time_embedders(transformer: nn.Module) -> list[nn.Module]:
    """diffusers' `TimestepEmbedding` modules in a transformer (the MLP on the sinusoidal timestep features)."""
    return [m for m in transformer.modules() if isinstance(m, TimestepEmbedding)]
