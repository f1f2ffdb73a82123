"""Frames held as fewer tokens, each standing for several: the logit of a token that stands for n is raised by
log n, so that attending to it once is attending to its n copies (TempCache, "Fast Autoregressive Video Diffusion
and World Models with Temporal Cache Compression and Sparse Attention", 2026). For exact duplicates that is exact.

Three ways in, named in a config's `precision` plan: `TemporalMerge(keep)` merges a frame's
tokens into the same place of the next frame where their keys are most alike (`kv.TempCache`),
`Summary()` stands a whole frame for by its mean token (soft pruning, `kv.SoftPrune`),
`KeepTokens(index)` holds some of its tokens as they are (`kv.HeavyHitters`). Keys
are stored before the temporal rotation; a merged token is read at its newest frame's position
and at its own place in the frame (a summary, its keys rotated to their places before averaging,
at the frame's first place, where the rotation within a frame is the identity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rope import rotate


@dataclass(frozen=True)
class TemporalMerge:
    """Plan value: hold the frame's `keep` tokens least like the same place of the next frame, merge the rest there."""

    keep: int


@dataclass(frozen=True)
class Summary:
    """Plan value: hold the frame as one token per head, its keys' and values' mean, standing for all its tokens."""


@dataclass(frozen=True, eq=False)
class KeepTokens:
    """Plan value: hold only the frame's tokens at `index` (B, k), each standing for itself (`kv.HeavyHitters`)."""

    index: torch.Tensor


@dataclass
class MergedFrame:
    """One frame's held tokens at one layer; each stands for `count` tokens of the frames `first` to `frame`."""

    key: torch.Tensor  # (B, k, heads, head_dim), before the temporal rotation
    value: torch.Tensor
    place: torch.Tensor  # (B, k) int32: the place in the frame whose rotation each key takes
    count: torch.Tensor  # (B, k) float32
    first: torch.Tensor  # (B, k) int32: the oldest frame each token stands for
    frame: int

    def __len__(self) -> int:
        return self.key.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key, self.value, self.place, self.count, self.first))

    def keys(self, dtype: torch.dtype) -> torch.Tensor:
        return self.key.to(dtype)

    def values(self, dtype: torch.dtype) -> torch.Tensor:
        return self.value.to(dtype)

    def log_count(self, oldest: int) -> torch.Tensor:
        """(B, k): the logit correction, counting only the frames from `oldest` on (older ones have left the cache)."""
        span = self.frame - self.first + 1
        left = self.frame - self.first.clamp(min=oldest) + 1
        return (self.count * left / span).log()


def whole_frame(key: torch.Tensor, value: torch.Tensor, frame: int) -> MergedFrame:
    """Every token of a frame (B, tokens, heads, head_dim), each standing for itself."""
    batch, tokens = key.shape[:2]
    place = torch.arange(tokens, dtype=torch.int32, device=key.device).expand(batch, -1).contiguous()
    return MergedFrame(key.clone(), value.clone(), place, torch.ones(batch, tokens, device=key.device),
                       torch.full_like(place, frame), frame)


def some_tokens(key: torch.Tensor, value: torch.Tensor, index: torch.Tensor, frame: int) -> MergedFrame:
    """The tokens at `index` (B, k) of a frame (B, tokens, heads, head_dim), each standing for itself."""
    pick = index.to(key.device).long()[..., None, None].expand(-1, -1, *key.shape[2:])
    place = index.to(key.device, torch.int32)
    return MergedFrame(key.gather(1, pick), value.gather(1, pick), place, torch.ones(place.shape, device=key.device),
                       torch.full_like(place, frame), frame)


def fold(older: MergedFrame, newer: MergedFrame, keep: int) -> MergedFrame:
    """Merge into `newer` (every place of a frame, changed in place) the tokens of `older` (every place too) whose keys
    are most like newer's at the same place, all but `keep` of them, averaging keys and values by count; return
    `older`'s `keep` others."""
    similarity = torch.nn.functional.cosine_similarity(older.key.flatten(2).float(), newer.key.flatten(2).float(), -1)
    order = similarity.argsort(-1)  # (B, tokens), least alike first
    kept, merged = order[:, :keep], order[:, keep:]

    def pick(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return t.gather(1, index.view(*index.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))

    a, b = pick(older.count, merged), pick(newer.count, merged)
    for name in ("key", "value"):
        target = getattr(newer, name)
        old, new = pick(getattr(older, name), merged).float(), pick(target, merged).float()
        mean = (old * a[..., None, None] + new * b[..., None, None]) / (a + b)[..., None, None]
        target.scatter_(1, merged.view(*merged.shape, 1, 1).expand_as(old), mean.to(target.dtype))
    newer.count.scatter_(1, merged, a + b)
    newer.first.scatter_(1, merged, pick(older.first, merged))
    return MergedFrame(pick(older.key, kept), pick(older.value, kept), pick(older.place, kept),
                       pick(older.count, kept), pick(older.first, kept), older.frame)


def merged_bytes(batch: int, tokens: int, heads: int, head_dim: int, itemsize: int) -> int:
    """The bytes of a `MergedFrame` of `tokens` tokens: keys and values, and each token's place, count and first."""
    return 2 * batch * tokens * heads * head_dim * itemsize + 3 * 4 * batch * tokens


def summary(key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frame: int,
            dtype: torch.dtype) -> MergedFrame:
    """A frame (B, tokens, heads, head_dim) as its mean token, in `dtype`; (cos, sin): the rotation of each place
    within the frame (the frame at temporal position 0), applied to the keys before averaging."""
    batch, tokens = key.shape[:2]
    mean_key = rotate(key.float(), cos, sin).mean(1, keepdim=True).to(dtype)
    place = torch.zeros(batch, 1, dtype=torch.int32, device=key.device)
    return MergedFrame(mean_key, value.float().mean(1, keepdim=True).to(dtype), place,
                       torch.full((batch, 1), float(tokens), device=key.device), torch.full_like(place, frame), frame)
