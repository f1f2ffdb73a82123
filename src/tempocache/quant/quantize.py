"""`tempocache.quantize(pipe_or_transformer, config)`: 8-bit linear layers inside the transformer blocks.

What is quantized: every `nn.Linear` inside the transformer blocks, except those of a
normalization module (adaLN modulation, which carries the time embedding). What stays
exact: everything outside the blocks (patch and time embeddings, text projection, final
norm and projection) and the norms. The time embedding's outputs are cached per timestep
(`time_embedding.py`). Weights are replaced by their 8-bit form, so the change is one-way,
as with torchao's `quantize_`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..step_cache.adapters import find_blocks, timestep_of
from ..step_cache.engine import _transformer_of, attached
from .attention import FP8AttentionHook, FP8AttentionMode, attention_modules, kernel_unavailable
from .linear import QuantLinear, clear_input_cache
from .numerics import KERNEL_MULTIPLE, check_format, kernel_takes
from .time_embedding import TimeEmbeddingCache, time_embedders

HOOK_NAME = "tempocache_quant"


@dataclass(frozen=True)
class W8A8:
    """Every quantizable linear in 8 bits, weights and activations, at every step.

    format: "fp8" (e4m3, `torch._scaled_mm`), "int8" (`torch._int_mm`), or "auto": FP8 on
    a GPU that has it (compute capability 8.9+), else INT8 on a GPU, and FP8 (simulated) on a CPU.
    attention: also run the blocks' self-attention in FP8 (`attention.py`; cuDNN on Hopper, simulated on a CPU).
    """

    format: str = "auto"
    attention: bool = False

    def check(self) -> None:
        if self.format != "auto":
            check_format(self.format)


def resolve_format(fmt: str, device: torch.device) -> str:
    """The format to run on `device`; refuses FP8 on a GPU without FP8 tensor cores."""
    if fmt == "auto":
        if device.type == "cuda":
            return "fp8" if torch.cuda.get_device_capability(device) >= (8, 9) else "int8"
        return "fp8"
    check_format(fmt)
    if fmt == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"format 'fp8' needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper and newer), but "
                         f"{torch.cuda.get_device_name(device)} has {major}.{minor}: use format='int8' (8-bit integer "
                         "tensor cores) or 'auto', or quantize on the CPU for FP8's simulated numerics")
    return fmt


def _block_linears(transformer: nn.Module) -> list[tuple[str, int, nn.Module]]:
    _, blocks, _ = find_blocks(transformer)
    names = {id(m): n for n, m in transformer.named_modules()}
    found = []
    for index, block in enumerate(blocks):
        skip = {id(m) for parent in block.modules() if "Norm" in type(parent).__name__ for m in parent.modules()}
        found += [(f"{names[id(block)]}.{n}", index, m) for n, m in block.named_modules()
                  if isinstance(m, (nn.Linear, QuantLinear)) and id(m) not in skip]
    return found


def quantizable_linears(transformer: nn.Module) -> list[tuple[str, int]]:
    """(qualified name, block index) of every linear `quantize` replaces, in execution order of the blocks."""
    return [(name, index) for name, index, m in _block_linears(transformer) if kernel_takes(m.in_features, m.out_features)]


def unfit_linears(transformer: nn.Module) -> dict[str, str]:
    """The block linears `quantize` keeps exact because the 8-bit kernels cannot take their shape, with why."""
    return {name: f"{m.in_features} x {m.out_features}: 8-bit kernels need multiples of {KERNEL_MULTIPLE}"
            for name, _, m in _block_linears(transformer) if not kernel_takes(m.in_features, m.out_features)}


class QuantState:
    """What `quantize` did to a transformer: its 8-bit layers, the time-embedding caches, an optional controller."""

    def __init__(self, transformer: nn.Module, config: Any, fmt: str, layers: dict[str, QuantLinear], weight_bytes: tuple[int, int],
                 kept_exact: dict[str, str]):
        self.transformer, self.config, self.format, self.layers, self.kept_exact = transformer, config, fmt, layers, kept_exact
        self.weight_bytes_before, self.weight_bytes_after = weight_bytes
        self.time_caches = []
        for module in time_embedders(transformer):
            cache = TimeEmbeddingCache()
            HookRegistry.check_if_exists_or_initialize(module).register_hook(cache, HOOK_NAME)
            self.time_caches.append(cache)
        self.controller = config.make_controller(self) if hasattr(config, "make_controller") else None
        self.attention = FP8AttentionMode() if config.attention else None
        if self.attention is not None:
            for module in attention_modules(find_blocks(transformer)[1]):
                HookRegistry.check_if_exists_or_initialize(module).register_hook(FP8AttentionHook(self.attention), HOOK_NAME)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_CallHook(self), HOOK_NAME)

    def stats(self) -> dict:
        """Weight memory of the quantized layers, share of their work done in 8 bits, block linears kept exact (and
        why), time-embedding cache hits."""
        low = self.controller.low_share() if self.controller is not None else 1.0
        return {
            "format": self.format,
            "layers": len(self.layers),
            "weight_bytes_before": self.weight_bytes_before,
            "weight_bytes_after": self.weight_bytes_after,
            "low_precision_share": low,
            "kept_exact": dict(self.kept_exact),
            "attention_fp8_calls": self.attention.fp8_calls if self.attention is not None else 0,
            "attention_exact_calls": dict(self.attention.exact_calls) if self.attention is not None else {},
            "time_embedding_hits": sum(c.hits for c in self.time_caches),
            "time_embedding_misses": sum(c.misses for c in self.time_caches),
        }


class _CallHook(ModelHook):
    """Around each transformer call: the controller (if any) picks precisions; afterwards no activation is held."""

    def __init__(self, state: QuantState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        if self.state.controller is not None:
            self.state.controller.decide(timestep_of(module, args, kwargs))
        return args, kwargs

    def post_forward(self, module, output):
        clear_input_cache()
        return output


def quantize(pipe_or_transformer: Any, config: Any = None) -> QuantState:
    """Replace the linears inside the transformer blocks by 8-bit ones, run as `config` says (`W8A8()` by default)."""
    transformer, _ = _transformer_of(pipe_or_transformer)
    config = W8A8() if config is None else config
    if not hasattr(config, "check"):
        raise TypeError(f"config must be tempocache.W8A8(...) or tempocache.TimestepAdaptive(...), got {type(config).__name__}")
    if getattr(transformer, "_tempocache_quant", None) is not None:
        raise RuntimeError(f"this {type(transformer).__name__} is already quantized ({transformer._tempocache_quant.config}); "
                           "load a fresh model to quantize it differently")
    config.check()
    device = next(transformer.parameters()).device
    fmt = resolve_format(config.format, device)
    if config.attention and device.type != "cpu" and (why := kernel_unavailable(device)):
        raise ValueError(f"attention=True needs cuDNN's FP8 attention, but {why}: use attention=False (8-bit linears "
                         "only), or quantize on the CPU for its simulated numerics")
    found, kept_exact = quantizable_linears(transformer), unfit_linears(transformer)
    if not found:
        raise TypeError(f"{type(transformer).__name__} has no linear layers inside its blocks that the 8-bit kernels take"
                        + (f" (kept exact: {kept_exact})" if kept_exact else ""))
    if kept_exact:
        warnings.warn(f"tempocache.quantize keeps {len(kept_exact)} block linears exact, shapes the 8-bit kernels cannot "
                      f"take: {kept_exact}", stacklevel=2)
    if hasattr(config, "prepare"):  # checks its profile against these layers before anything changes
        config = config.prepare(transformer, fmt, [name for name, _ in found])
    originals, layers = replace_linears(transformer, [name for name, _ in found], fmt)
    before = sum(m.weight.numel() * m.weight.element_size() for m in originals.values())
    after = sum(q.weight_q.numel() * q.weight_q.element_size() + q.weight_scale.numel() * 4 for q in layers.values())
    state = QuantState(transformer, config, fmt, layers, (before, after), kept_exact)
    transformer._tempocache_quant = state
    return state


def replace_linears(transformer: nn.Module, names: list[str], fmt: str) -> tuple[dict[str, nn.Linear], dict[str, QuantLinear]]:
    """Swap each named linear for its 8-bit form; returns (originals, replacements) by name."""
    originals, layers = {}, {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        originals[name] = getattr(parent, child)
        layers[name] = QuantLinear(originals[name], fmt)
        setattr(parent, child, layers[name])
    return originals, layers


def restore_linears(transformer: nn.Module, originals: dict[str, nn.Linear]) -> None:
    for name, linear in originals.items():
        parent_name, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent_name), child, linear)


def quant_state(pipe_or_transformer: Any) -> QuantState:
    return attached(pipe_or_transformer, "_tempocache_quant", "this {name} is not quantized; call tempocache.quantize() first")


def quant_stats(pipe_or_transformer: Any) -> dict:
    """See `QuantState.stats`."""
    return quant_state(pipe_or_transformer).stats()
