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


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, fmt: str):
        super().__init__()
        self.in_features, self.out_features, self.fmt = linear.in_features, linear.out_features, fmt
        weight_q, weight_scale = quantize_rows(linear.weight.detach(), fmt)
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = linear.bias
        self.low_precision = True  # set per call by a TimestepAdaptive controller

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.low_precision:
            return F.linear(x, dequantize_rows(self.weight_q, self.weight_scale, x.dtype), self.bias)
        a_q, a_scale = _quantized_input(x, self.fmt)
        matmul = kernel_matmul if kernel_supported(x, self.fmt) else simulated_matmul
        y = matmul(a_q, a_scale, self.weight_q, self.weight_scale, self.bias, x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    @property
    def macs_per_token(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


_last_input: tuple = ()


def _quantized_input(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The activations in 8 bits, one scale per token; quantized once when consecutive layers read the same
    tensor (attention's q, k and v projections). Holding `x` keeps its id from being reused."""
    global _last_input
    if _last_input and _last_input[0] is x and _last_input[1] == (x._version, fmt):
        return _last_input[2]
    quantized = quantize_activations(x.reshape(-1, x.shape[-1]), fmt)
    _last_input = (x, (x._version, fmt), quantized)
    return quantized


def clear_input_cache() -> None:
    global _last_input
    _last_input = ()

