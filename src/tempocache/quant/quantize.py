"""`tempocache.quantize(pipe_or_transformer, config, filter_fn)`: 8-bit linear layers inside the transformer blocks.

What is quantized: the `nn.Linear`s inside the transformer blocks that `filter_fn(module, name)`
accepts; by default all of them but those carrying the timestep's modulation (inside a
normalization module such as adaLN, or a family's declared modulation, see
`models.modulation_modules`). What stays exact: everything outside the blocks (patch and time
embeddings, text projection, final norm and projection) and the norms. The time embedding's
outputs are cached per timestep (`time_embedding.py`). Weights are replaced by their 8-bit
form, so the change is one-way, as with torchao's `quantize_`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..models import (
    QUANT,
    Attachment,
    Blocks,
    Hook,
    add_hook,
    attach,
    attached,
    attention_modules,
    find_blocks,
    modulation_modules,
    require_attached,
    timestep_of,
    transformer_of,
)
from .attention import FP8AttentionHook, FP8AttentionMode, kernel_unavailable
from .linear import Activations, QuantLinear
from .numerics import KERNEL_MULTIPLE, check_format, kernel_takes
from .time_embedding import TimeEmbeddingCache, time_embedders

FilterFn = Callable[[nn.Module, str], bool]  # (a linear inside a block, its qualified name) -> quantize it?


class QuantConfig:
    """Base of every quantization config. Subclasses are frozen dataclasses with a `format` ("fp8", "int8" or
    "auto") and an `attention` flag (FP8 self-attention too); the methods below do nothing unless overridden."""

    format: str
    attention: bool

    def check(self) -> None:
        """Raise ValueError, before anything changes, if a setting is out of range."""
        if self.format != "auto":
            check_format(self.format)
        if not isinstance(self.attention, bool):
            raise ValueError(f"attention must be True or False, got {self.attention!r}")

    def prepare(self, transformer: nn.Module, fmt: str, layers: list[str]) -> "QuantConfig":
        """This config ready for these layers of this transformer in `fmt` (e.g. with its profile loaded and checked);
        raises before anything changes if it cannot run there."""
        return self

    def make_controller(self, state: "QuantState") -> Any:
        """What sets the layers' precision before each transformer call (its `decide(timestep)`), or None: all in 8 bits."""
        return None


@dataclass(frozen=True)
class W8A8(QuantConfig):
    """Every quantized linear in 8 bits, weights and activations, at every step.

    format: "fp8" (e4m3, `torch._scaled_mm`), "int8" (`torch._int_mm`), or "auto": FP8 on
    a GPU that has it (compute capability 8.9+), else INT8 on a GPU, and FP8 (simulated) on a CPU.
    attention: also run the blocks' self-attention in FP8 (`attention.py`; cuDNN on Hopper, simulated on a CPU).
    """

    format: str = "auto"
    attention: bool = False


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


def default_filter(blocks: Blocks) -> FilterFn:
    """Every linear inside the blocks but the modulation's."""
    modulation = modulation_modules(blocks)
    return lambda module, name: id(module) not in modulation


def _block_linears(transformer: nn.Module, filter_fn: FilterFn | None) -> list[tuple[str, int, nn.Module]]:
    blocks = find_blocks(transformer)
    keep = filter_fn or default_filter(blocks)
    names = {id(m): n for n, m in transformer.named_modules()}
    found = []
    for index, block in enumerate(blocks.modules):
        for n, m in block.named_modules():
            name = f"{names[id(block)]}.{n}"
            if isinstance(m, (nn.Linear, QuantLinear)) and keep(m, name):
                found.append((name, index, m))
    return found


def quantizable_linears(transformer: nn.Module, filter_fn: FilterFn | None = None) -> list[tuple[str, int]]:
    """(qualified name, block index) of every linear `quantize` replaces, in execution order of the blocks."""
    return [(name, index) for name, index, m in _block_linears(transformer, filter_fn) if kernel_takes(m.in_features, m.out_features)]


def unfit_linears(transformer: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, str]:
    """The chosen block linears `quantize` keeps exact because the 8-bit kernels cannot take their shape, with why."""
    return {name: f"{m.in_features} x {m.out_features}: 8-bit kernels need multiples of {KERNEL_MULTIPLE}"
            for name, _, m in _block_linears(transformer, filter_fn) if not kernel_takes(m.in_features, m.out_features)}


def by_reason(kept_exact: dict[str, str]) -> str:
    """One line per reason: how many linears, the first of them, why."""
    reasons: dict[str, list[str]] = {}
    for name, why in kept_exact.items():
        reasons.setdefault(why, []).append(name)
    return "\n".join(f"  {len(names)} linear(s) of {why} (e.g. {names[0]})" for why, names in reasons.items())


class QuantState(Attachment):
    """What `quantize` did to a transformer: its 8-bit layers, the time-embedding caches, an optional controller."""

    part = QUANT

    def __init__(self, transformer: nn.Module, config: QuantConfig, fmt: str, layers: dict[str, QuantLinear],
                 activations: Activations, weight_bytes: tuple[int, int], kept_exact: dict[str, str]):
        self.transformer, self.config, self.format, self.layers, self.kept_exact = transformer, config, fmt, layers, kept_exact
        self.activations = activations
        self.weight_bytes_before, self.weight_bytes_after = weight_bytes
        self.time_caches = []
        for module in time_embedders(transformer):
            cache = TimeEmbeddingCache()
            add_hook(module, cache, QUANT)
            self.time_caches.append(cache)
        self.controller = config.make_controller(self)
        self.attention = FP8AttentionMode() if config.attention else None
        if self.attention is not None:
            for module in attention_modules(find_blocks(transformer)):
                add_hook(module, FP8AttentionHook(self.attention), QUANT)
        add_hook(transformer, _CallHook(self), QUANT)

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


class _CallHook(Hook):
    """Around each transformer call: the controller (if any) picks precisions; afterwards no activation is held."""

    def __init__(self, state: QuantState):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        if self.state.controller is not None:
            self.state.controller.decide(timestep_of(module, args, kwargs))
        return args, kwargs

    def post_forward(self, module, output):
        self.state.activations.clear()
        return output


def quantize(pipe_or_transformer: Any, config: QuantConfig | None = None, filter_fn: FilterFn | None = None) -> QuantState:
    """Replace linears inside the transformer blocks by 8-bit ones, run as `config` says (`W8A8()` by default).

    filter_fn(module, qualified_name) -> bool chooses which of the block linears are quantized, as torchao's
    does (default: all but the modulation's); linears outside the blocks always stay exact.
    """
    transformer, pipe = transformer_of(pipe_or_transformer)
    config = W8A8() if config is None else config
    if isinstance(config, type) and issubclass(config, QuantConfig):
        raise TypeError(f"config must be a config object, got the class {config.__name__}: pass {config.__name__}(...)")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a tempocache quantization config (tempocache.W8A8(...) or "
                        f"tempocache.TimestepAdaptive(...)), got {type(config).__name__}")
    if (existing := attached(transformer, QUANT)) is not None:
        raise RuntimeError(f"this {type(transformer).__name__} is already quantized ({existing.config}); "
                           "load a fresh model to quantize it differently")
    config.check()
    device = next(transformer.parameters()).device
    fmt = resolve_format(config.format, device)
    if config.attention and device.type != "cpu" and (why := kernel_unavailable(device)):
        raise ValueError(f"attention=True needs cuDNN's FP8 attention, but {why}: use attention=False (8-bit linears "
                         "only), or quantize on the CPU for its simulated numerics")
    found, kept_exact = quantizable_linears(transformer, filter_fn), unfit_linears(transformer, filter_fn)
    if not found:
        raise TypeError(f"{type(transformer).__name__} has no linear layers inside its blocks that the 8-bit kernels take"
                        + (" and filter_fn accepts" if filter_fn else "") + (f":\n{by_reason(kept_exact)}" if kept_exact else ""))
    if kept_exact:
        warnings.warn(f"tempocache.quantize keeps {len(kept_exact)} block linears exact, shapes the 8-bit kernels cannot "
                      f"take:\n{by_reason(kept_exact)}", stacklevel=2)
    config = config.prepare(transformer, fmt, [name for name, _ in found])
    activations = Activations()
    originals, layers = replace_linears(transformer, [name for name, _ in found], fmt, activations)
    before = sum(m.weight.numel() * m.weight.element_size() for m in originals.values())
    after = sum(q.weight_q.numel() * q.weight_q.element_size() + q.weight_scale.numel() * 4 for q in layers.values())
    state = QuantState(transformer, config, fmt, layers, activations, (before, after), kept_exact)
    attach(transformer, QUANT, state)
    for owner in (transformer, pipe):  # the pipeline's refuses before it writes any other component
        if hasattr(owner, "save_pretrained"):
            owner.save_pretrained = _save_refused(type(transformer).__name__)
    return state


def _save_refused(name: str) -> Callable:
    """What a quantized model's `save_pretrained` becomes: its 8-bit layers are not weights `from_pretrained` can load."""
    def save_pretrained(*args, **kwargs):
        raise TypeError(f"this {name} is quantized by tempocache: save_pretrained would write 8-bit layers that "
                        f"{name}.from_pretrained cannot load; save the model before quantizing, and quantize again "
                        "after loading")
    return save_pretrained


def replace_linears(transformer: nn.Module, names: list[str], fmt: str,
                    activations: Activations) -> tuple[dict[str, nn.Linear], dict[str, QuantLinear]]:
    """Swap each named linear for its 8-bit form, all quantizing their inputs through `activations`; returns
    (originals, replacements) by name."""
    originals, layers = {}, {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        originals[name] = getattr(parent, child)
        layers[name] = QuantLinear(originals[name], fmt, activations)
        setattr(parent, child, layers[name])
    return originals, layers


def restore_linears(transformer: nn.Module, originals: dict[str, nn.Linear]) -> None:
    for name, linear in originals.items():
        parent_name, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent_name), child, linear)


def quant_state(pipe_or_transformer: Any) -> QuantState:
    return require_attached(pipe_or_transformer, QUANT, "this {name} is not quantized; call tempocache.quantize() first")


def quant_stats(pipe_or_transformer: Any) -> dict:
    """See `QuantState.stats`."""
    return quant_state(pipe_or_transformer).stats()
