"""A linear layer whose weight is stored once in 8 bits, run in one of two precisions.

- low (W8A8): activations quantized per token on the fly, 8-bit product (`numerics`);
- high (W8A16): the 8-bit weight dequantized to the activations' dtype, an ordinary matmul.

The weight's memory is halved (bf16) or quartered (float32) whichever path runs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .numerics import dequantize_rows, kernel_matmul, kernel_supported, quantize_activations, quantize_rows, simulated_matmul


class Activations:
    """Quantizes layers' inputs, keeping the last one's 8-bit copy for the next layer that reads the same tensor
    (attention's q, k and v projections). One per quantized transformer, emptied after each of its calls.

    fuse: quantize with one compiled kernel on a GPU (off: eager, for comparison)."""

    def __init__(self, fuse: bool = True):
        self.fuse = fuse
        self.last: tuple = ()  # (input, (its version, format), its 8-bit copy); holding the input keeps its id unique

    def quantize(self, x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The activations in 8 bits, one scale per token."""
        if self.last and self.last[0] is x and self.last[1] == (x._version, fmt):
            return self.last[2]
        quantized = quantize_activations(x.reshape(-1, x.shape[-1]), fmt, self.fuse)
        self.last = (x, (x._version, fmt), quantized)
        return quantized

    def clear(self) -> None:
        self.last = ()


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, fmt: str, activations: Activations | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = linear.in_features, linear.out_features, fmt
        weight_q, weight_scale = quantize_rows(linear.weight.detach(), fmt)
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = linear.bias
        self.activations = activations or Activations()
        self.low_precision = True  # set per call by a TimestepAdaptive controller

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.low_precision:
            return F.linear(x, dequantize_rows(self.weight_q, self.weight_scale, x.dtype), self.bias)
        a_q, a_scale = self.activations.quantize(x, self.fmt)
        matmul = kernel_matmul if kernel_supported(x, self.fmt) else simulated_matmul
        y = matmul(a_q, a_scale, self.weight_q, self.weight_scale, self.bias, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    @property
    def macs_per_token(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"
