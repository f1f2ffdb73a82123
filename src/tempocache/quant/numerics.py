"""W8A8 numerics: symmetric 8-bit values with one scale per row, and the matmul of two such operands.

Weights get one scale per output channel, activations one per token (computed on the fly):
    x_q = x / s,  s = amax(|row of x|) / QMAX,  y = (a_q @ w_q^T) * s_a * s_w^T + bias.
FP8 is e4m3 (QMAX 448, rounding by the cast); INT8 rounds to nearest and clamps to +-127.
`scaled_matmul` runs `torch._scaled_mm` (FP8) or `torch._int_mm` (INT8) on a GPU, and
`simulated_matmul` the same arithmetic in float32 anywhere: the reference for tests and
the CPU path.
"""

from __future__ import annotations

import functools

import torch

FORMATS = {"fp8": (torch.float8_e4m3fn, 448.0), "int8": (torch.int8, 127.0)}
# Both weight dimensions must be multiples of this for torch._scaled_mm (torch._int_mm needs 8). One rule for both
# formats and every device, so a layer is 8-bit or exact the same way on the CPU as on a GPU.
KERNEL_MULTIPLE = 16


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown 8-bit format {fmt!r}; accepted: {', '.join(FORMATS)}")
    return fmt


def quantize_rows(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q, scale) with x ~= x_q * scale, one float32 scale per row (shape (rows, 1))."""
    dtype, qmax = FORMATS[fmt]
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / qmax
    scaled = x / scale  # in float32 (type promotion), whatever x's dtype
    if fmt == "int8":
        scaled = scaled.round().clamp(-qmax, qmax)
    return scaled.to(dtype), scale


@functools.cache
def compiled(fn):
    """`fn` through torch.compile, compiled once per function, per shape: per-shape kernels ran 2x faster than
    dynamic ones here."""
    return torch.compile(fn, dynamic=False)


def quantize_activations(x: torch.Tensor, fmt: str, fuse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows`, on a GPU as one fused kernel (torch.compile) unless `fuse` is off: in eager mode its passes
    over the activations cost as much as the 8-bit matmul saves."""
    if not (x.is_cuda and fuse):
        return quantize_rows(x, fmt)
    return compiled(quantize_rows)(x, fmt)


def dequantize_rows(x_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x_q.float() * scale).to(dtype)


def simulated_matmul(a_q, a_scale, w_q, w_scale, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """The W8A8 product in float32 from the 8-bit values: what the GPU kernels compute, up to summation order."""
    y = (a_q.float() @ w_q.float().t()) * a_scale * w_scale.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def kernel_matmul(a_q, a_scale, w_q, w_scale, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """The W8A8 product on 8-bit tensor cores: `torch._scaled_mm` for FP8, `torch._int_mm` for INT8."""
    if a_q.dtype == torch.int8:
        y = torch._int_mm(a_q, w_q.t()).float() * a_scale * w_scale.t()
        return (y if bias is None else y + bias.float()).to(out_dtype)
    if out_dtype == torch.float32 and bias is not None:  # _scaled_mm fuses a bias only into 16-bit outputs
        return torch._scaled_mm(a_q, w_q.t(), scale_a=a_scale, scale_b=w_scale.t(), out_dtype=out_dtype) + bias
    return torch._scaled_mm(a_q, w_q.t(), scale_a=a_scale, scale_b=w_scale.t(), bias=bias, out_dtype=out_dtype)


def kernel_takes(in_features: int, out_features: int) -> bool:
    return in_features % KERNEL_MULTIPLE == 0 and out_features % KERNEL_MULTIPLE == 0


def kernel_supported(x: torch.Tensor, fmt: str) -> bool:
    """Whether the 8-bit kernels take this call (the layer's shape is checked once, by `quantize`): a GPU with
    the format; for INT8, more than 16 rows."""
    if not x.is_cuda:
        return False
    if fmt == "fp8":
        return torch.cuda.get_device_capability(x.device) >= (8, 9)
    return x.numel() // x.shape[-1] > 16
