"""Captions to `encoder_hidden_states`: a word vocabulary and a tiny learned encoder.

The reference models have no pretrained text encoder: each word of the ShapesWorld
grammar gets a learned embedding, positions get learned embeddings, and two small
transformer layers let colour words bind to the shape words next to them.
The empty caption (all padding) is the unconditional input for classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import nn

PAD = "<pad>"


class Tokenizer:
    def __init__(self, words: list[str] | tuple[str, ...], max_length: int):
        self.words = [PAD, *words]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.max_length = max_length

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """Token ids (B, max_length), padded; raises ValueError on words outside the vocabulary."""
        rows = []
        for caption in captions:
            words = caption.lower().split()
            unknown = [w for w in words if w not in self.ids or w == PAD]
            if unknown:
                raise ValueError(
                    f"unknown word(s) {', '.join(map(repr, unknown))} in caption {caption!r}; "
                    f"the vocabulary is: {' '.join(self.words[1:])}"
                )
            if len(words) > self.max_length:
                raise ValueError(f"caption {caption!r} has {len(words)} words; at most {self.max_length} are allowed")
            rows.append([self.ids[w] for w in words] + [0] * (self.max_length - len(words)))
        return torch.tensor(rows, dtype=torch.long)


class WordEncoder(nn.Module):
    """Token ids (B, L) -> hidden states (B, L, dim)."""

    def __init__(self, vocab_size: int, max_length: int, dim: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.config = {"vocab_size": vocab_size, "max_length": max_length, "dim": dim, "layers": layers, "heads": heads}
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(max_length, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.5)
        nn.init.normal_(self.position, std=0.1)

    @property
    def device(self) -> torch.device:  # diffusers pipelines ask their components for it
        return self.position.device

    @property
    def dtype(self) -> torch.dtype:
        return self.position.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encoder(self.embed(ids) + self.position))
