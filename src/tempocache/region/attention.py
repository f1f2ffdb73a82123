"""Flux attention that keeps every token's keys and values at a full step and, at an edited-only step, attends the
edited tokens (and the instruction's) to them, their own rows written over with what this step computes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections
from torch import nn


@dataclass
class RegionKV:
    """One branch's cache: per attention layer, the rotated keys and the values of the whole sequence (instruction,
    noisy image, image edited), (B, L, heads, head_dim), and the rotary tables (cos, sin), (L, head_dim)."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys.values(), *self.values.values()])


@dataclass
class RegionCall:
    """What the transformer's hook tells the attention layers about the call under way."""

    mode: str = "off"  # "off", "record" (a full step: keep every token's keys and values) or "region"
    kv: RegionKV | None = None
    positions: torch.Tensor | None = None  # region: (B, S) the call's tokens' rows in the whole sequence


class RegionAttention:
    """In place of a Flux block's attention processor while RegionE is enabled; the original one's math otherwise."""

    def __init__(self, call: RegionCall, layer: int, backend=None):
        self.call, self.layer, self._attention_backend = call, layer, backend

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(attn, hidden_states,
                                                                                          encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))  # (B, S, heads, dim)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:  # a dual-stream block: the instruction's tokens first
            encoder_query, encoder_key, encoder_value = (t.unflatten(-1, (-1, attn.head_dim))
                                                         for t in (encoder_query, encoder_key, encoder_value))
            query = torch.cat([attn.norm_added_q(encoder_query), query], 1)
            key = torch.cat([attn.norm_added_k(encoder_key), key], 1)
            value = torch.cat([encoder_value, value], 1)
        call = self.call
        if call.mode == "region":
            keys, values = call.kv.keys[self.layer], call.kv.values[self.layer]
            query, key = (self._rotate_rows(t, call.kv.rotary, call.positions) for t in (query, key))
            rows = call.positions[..., None, None].expand(-1, -1, *key.shape[2:])
            keys.scatter_(1, rows, key)  # the step's own rows, over the last full step's
            values.scatter_(1, rows, value)
            key, value = keys, values
        else:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            if call.mode == "record":
                call.kv.keys[self.layer], call.kv.values[self.layer] = key, value
                call.kv.rotary = image_rotary_emb
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text = encoder_hidden_states.shape[1]
        encoder_out, out = out[:, :text], out[:, text:]
        return attn.to_out[1](attn.to_out[0](out.contiguous())), attn.to_add_out(encoder_out.contiguous())

    @staticmethod
    def _rotate_rows(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        """x (B, S, heads, dim) rotated at its rows `positions` (B, S) of the whole sequence: each sample its own."""
        b, s = positions.shape
        cos, sin = (r[positions.reshape(-1)] for r in rotary)  # (B * S, dim)
        return apply_rotary_emb(x.reshape(1, b * s, *x.shape[2:]), (cos, sin), sequence_dim=1).reshape(x.shape)
