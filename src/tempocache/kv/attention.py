"""The self-attention processor that reads and writes the streaming KV cache.

Installed on every block's self-attention (`attn1`) of a Wan-style transformer
(`SkyReelsV2Transformer3DModel`, `WanTransformer3DModel`) for the length of a stream, in
place of the model's own processor, and computing what it computes, except that the
chunk's queries attend to the cached frames' keys and values as well as to the chunk's
own, at the positions the cache gives (`rope.py`). Cross-attention is left as it is.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

from .cache import KVCache


class StreamingSelfAttention:
    def __init__(self, cache: KVCache, layer: int, backend=None, chunk_is_one_block: bool = True):
        self.cache, self.layer = cache, layer
        self.backend = backend  # the replaced processor's attention backend (diffusers' `set_attention_backend`)
        self.chunk_is_one_block = chunk_is_one_block  # then the model's mask over the chunk is all true

    # A compiled model (e.g. diffusers' `compile_repeated_blocks()`) runs this eagerly: the cache's
    # Python state (frames held, positions) changes every chunk and would recompile each call.
    @torch.compiler.disable
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None) -> torch.Tensor:
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # (B, chunk tokens, heads, head_dim)
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        mask = None if self.chunk_is_one_block else attention_mask  # an all-true mask only slows attention down

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            m = mask
            if m is not None:  # the model's block-causal mask over the chunk: every cached frame is before it
                m = torch.cat([m.new_ones(*m.shape[:-1], k.shape[1] - key.shape[1]), m], -1)
            if bias is not None:  # merged tokens' logit corrections (B, keys); a compact cache has no mask (one block)
                m = bias[:, None, None].to(q.dtype)
            return dispatch_attention_fn(q, k, v, attn_mask=m, dropout_p=0.0, is_causal=False, backend=self.backend)

        out = self.cache.attend(self.layer, query, key, value, attention)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def self_attentions(transformer: nn.Module) -> list[nn.Module]:
    """Each block's self-attention, in order."""
    blocks = getattr(transformer, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn1") for b in blocks):
        raise TypeError(f"streaming needs a Wan-style transformer whose blocks have a self-attention `attn1` "
                        f"(SkyReelsV2Transformer3DModel, WanTransformer3DModel), got {type(transformer).__name__}")
    return [b.attn1 for b in blocks]


@contextlib.contextmanager
def installed(transformer: nn.Module, cache: KVCache) -> Iterator[None]:
    """The transformer's self-attentions read and write `cache` inside the block; their own processors after it."""
    attentions = self_attentions(transformer)
    originals = [a.processor for a in attentions]
    try:
        one_block = cache.layout.chunk_frames <= getattr(transformer.config, "num_frame_per_block", 1)
        if cache.config.compacts() and not one_block:
            raise ValueError("a quantized or merged KV cache attends without the model's mask: it needs chunks of one "
                             "block (chunk frames <= the model's num_frame_per_block)")
        for i, (a, original) in enumerate(zip(attentions, originals)):
            a.set_processor(StreamingSelfAttention(cache, i, getattr(original, "_attention_backend", None), one_block))
        yield
    finally:
        for a, original in zip(attentions, originals):
            a.set_processor(original)
