"""RegionE's velocity decay: per step, how the edited tokens' velocity scales from one step to the next."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..models import ContextHook, add_hook, remove_hook, transformer_of
from ..reference.edits import sample_edit_batch

RECORDER = "_tempocache_region_gamma"


class _Velocities(ContextHook):
    """Keeps every output of the conditional branch (calls no cache context names count as it)."""

    def __init__(self):
        super().__init__()
        self.outputs: list[torch.Tensor] = []

    def new_forward(self, module, *args, **kwargs):
        out = self.original(*args, **kwargs)
        if self.cache_context is None or self.cache_context.name == "cond":
            self.outputs.append((out[0] if isinstance(out, tuple) else out.sample).detach().float())
        return out


def fit_gamma(pipe: Any, count: int = 16, steps: int | None = None, seed: int = 0) -> tuple[float, ...]:
    """Per step i, the least-squares factor g with v_i ~ g v_(i-1) over the tokens that training edits change, from
    full-compute edits of `count` of them (the conditional branch); step 0, which has no step before it, gets 1."""
    transformer, pipe = transformer_of(pipe)
    if pipe is None or getattr(pipe.spec, "task", None) != "edit":
        raise ValueError("fit_gamma runs calibration edits through an editing pipeline (e.g. shapes-edit's)")
    steps = pipe.spec.default_steps if steps is None else steps
    batch = sample_edit_batch(np.random.default_rng(seed), count, "train", pipe.spec.size)
    recorder = _Velocities()
    add_hook(transformer, recorder, RECORDER)
    try:
        pipe(batch.instructions(), num_inference_steps=steps, image=batch.sources, seed=seed)
    finally:
        remove_hook(transformer, RECORDER)
    if len(recorder.outputs) != steps:
        raise RuntimeError(f"recorded {len(recorder.outputs)} conditional calls for {steps} steps")
    edited = torch.nn.functional.max_pool2d(batch.masks[:, None].float(), 2).flatten(1).bool()  # (B, tokens)
    edited = edited.to(recorder.outputs[0].device)
    tokens = edited.shape[1]
    velocities = [v[:, :tokens][edited] for v in recorder.outputs]  # each (edited tokens, C)
    gamma = [1.0] + [float((now * before).sum() / before.square().sum()) for before, now in zip(velocities, velocities[1:])]
    return tuple(gamma)
