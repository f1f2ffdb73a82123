"""The transformer inside what a user hands us, and what tempocache attached to it.

Each part of tempocache keeps the object it installs on the transformer itself (so that a
pipeline and its transformer find the same one), under a name of its own.
"""

from __future__ import annotations

from typing import Any

from torch import nn

STEP_CACHE = "_tempocache_step_cache"
QUANT = "_tempocache_quant"


def transformer_of(obj: Any) -> tuple[nn.Module, Any]:
    """(the transformer, the pipeline or None) of a diffusers pipeline (with a `.transformer`) or a transformer."""
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, nn.Module):
        return transformer, obj
    if isinstance(obj, nn.Module):
        return obj, None
    raise TypeError(f"expected a diffusers pipeline (with a .transformer) or a transformer module, got {type(obj).__name__}")


def attached(pipe_or_transformer: Any, attribute: str) -> Any:
    """What tempocache attached to the transformer as `attribute`, or None."""
    return getattr(transformer_of(pipe_or_transformer)[0], attribute, None)


def require_attached(pipe_or_transformer: Any, attribute: str, missing: str) -> Any:
    """What tempocache attached as `attribute`; if nothing, a RuntimeError saying `missing` ({name}: the class)."""
    found = attached(pipe_or_transformer, attribute)
    if found is None:
        raise RuntimeError(missing.format(name=type(transformer_of(pipe_or_transformer)[0]).__name__))
    return found


def attach(transformer: nn.Module, attribute: str, obj: Any) -> None:
    setattr(transformer, attribute, obj)


def detach(transformer: nn.Module, attribute: str) -> None:
    delattr(transformer, attribute)
