"""KV quantization (KIVI, Liu et al. 2024): keys per channel, values per token, the newest frames exact.

A frame leaving the `recent_frames` newest is stored in 8, 4 or 2 bits (asymmetric min-max,
two 4-bit or four 2-bit codes per byte; 2 bits as in "Plug-and-Play 1.x-Bit KV Cache Quantization for Video
LLMs"), keys with a scale and zero per channel over the frame's tokens
(key outliers sit in channels), values per token. Keys are quantized before rotation.
Attention never dequantizes the whole cache at once: by default each layer rebuilds its own
quantized frames (a layer's share of the cache) and reads them with the model's fused
attention; with `group_frames` it reads them that many frames at a time, merging the blocks'
softmax exactly (`blockwise_attention`), in plain PyTorch. The study of 33 KV methods on
Self-Forcing found methods that rebuild a full-precision cache to attend exceeding the
uncompressed peak memory. Only `group_frames="chunk"`, asked for, trades that away for speed:
each layer's frames are rebuilt once a chunk and held for all of its denoising steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

BITS = (8, 4, 2)

REBUILD_ONCE = "chunk"  # compact frames rebuilt once a chunk and held for its steps


@dataclass(frozen=True)
class KVQuant:
    """bits: 8, 4 or 2; recent_frames: the newest committed frames kept exact; group_frames: quantized frames
    dequantized at a time while attending, read block by block (None: a layer's at once at every call, read by fused
    attention; "chunk": a layer's once a chunk, held in full precision for its steps, every layer's at once)."""

    bits: int = 8
    recent_frames: int = 4
    group_frames: int | str | None = None

    def check(self, head_dim: int) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        for name, least in (("recent_frames", 0), ("group_frames", 1)):
            value = getattr(self, name)
            if name == "group_frames" and value in (None, REBUILD_ONCE):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer of at least {least}" + (
                    f", None or {REBUILD_ONCE!r}" if name == "group_frames" else "") + f", got {value!r}")
        per_byte = 8 // self.bits
        if head_dim % per_byte:
            raise ValueError(f"{self.bits}-bit keys and values pack {per_byte} codes per byte along the head dimension, "
                             f"which is not a multiple of {per_byte} here ({head_dim}): use bits=8")


@dataclass
class QuantizedFrame:
    """One frame's keys and values in `bits` bits: codes (uint8) and the scale and zero that undo them."""

    key_codes: torch.Tensor  # (B, tokens, heads, head_dim or head_dim / 2)
    key_scale: torch.Tensor  # (B, 1, heads, head_dim): per channel
    key_zero: torch.Tensor
    value_codes: torch.Tensor
    value_scale: torch.Tensor  # (B, tokens, heads, 1): per token
    value_zero: torch.Tensor
    bits: int

    def __len__(self) -> int:
        return self.key_codes.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key_codes, self.key_scale, self.key_zero,
                                                          self.value_codes, self.value_scale, self.value_zero))

    def keys(self, dtype: torch.dtype) -> torch.Tensor:
        return _decode(self.key_codes, self.key_scale, self.key_zero, self.bits).to(dtype)

    def values(self, dtype: torch.dtype) -> torch.Tensor:
        return _decode(self.value_codes, self.value_scale, self.value_zero, self.bits).to(dtype)


def exact_bytes(batch: int, tokens: int, heads: int, head_dim: int, itemsize: int) -> int:
    """The bytes of one frame's keys and values at one layer, unquantized."""
    return 2 * batch * tokens * heads * head_dim * itemsize


def quantized_bytes(batch: int, tokens: int, heads: int, head_dim: int, bits: int) -> int:
    """The bytes of one frame's `QuantizedFrame`: codes, the keys' scale and zero per channel, the values' per token."""
    codes = batch * tokens * heads * head_dim * bits // 8
    return 2 * codes + 2 * 4 * batch * heads * head_dim + 2 * 4 * batch * tokens * heads


def quantize_frame(key: torch.Tensor, value: torch.Tensor, bits: int) -> QuantizedFrame:
    """key, value: (B, tokens, heads, head_dim), one frame, keys before rotation."""
    key_codes, key_scale, key_zero = _encode(key, bits, dim=1)
    value_codes, value_scale, value_zero = _encode(value, bits, dim=-1)
    return QuantizedFrame(key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, bits)


def _encode(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.float()
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((high - low) / (2**bits - 1)).clamp(min=1e-8)
    codes = ((x - low) / scale).round().clamp(0, 2**bits - 1).to(torch.uint8)
    packed = codes[..., 0::8 // bits]
    for i in range(1, 8 // bits):  # the codes of neighbouring channels share a byte, lowest first
        packed = packed | (codes[..., i::8 // bits] << (bits * i))
    return packed, scale, low


def _decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    if bits < 8:
        codes = torch.stack([(codes >> (bits * i)) & (2**bits - 1) for i in range(8 // bits)], -1).flatten(-2)
    return codes.float() * scale + zero


def blockwise_attention(query: torch.Tensor, blocks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
                        ) -> torch.Tensor:
    """Softmax attention of query (B, Nq, heads, head_dim) over blocks of keys and values (B, Nk_i, heads, head_dim)
    and a correction added to their logits (B, Nk_i) or None, one block in memory at a time, the blocks' partial
    softmaxes merged exactly (running maximum and sum, as flash attention)."""
    q = query.transpose(1, 2).float() * query.shape[-1] ** -0.5  # (B, heads, Nq, D)
    top = total = out = None
    for key, value, bias in blocks:
        scores = q @ key.transpose(1, 2).float().transpose(-1, -2)  # (B, heads, Nq, Nk_i)
        if bias is not None:
            scores = scores + bias[:, None, None]
        block_top = scores.amax(-1, keepdim=True)
        new_top = block_top if top is None else torch.maximum(top, block_top)
        weights = (scores - new_top).exp()
        block_out = weights @ value.transpose(1, 2).float()
        if top is None:
            total, out = weights.sum(-1, keepdim=True), block_out
        else:
            rescale = (top - new_top).exp()
            total = total * rescale + weights.sum(-1, keepdim=True)
            out = out * rescale + block_out
        top = new_top
    return (out / total).transpose(1, 2).to(query.dtype)
