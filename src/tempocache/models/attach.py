"""The transformer inside what a user hands us, and what tempocache attached to it.

Each part of tempocache keeps the object it installs on the transformer itself (so that a
pipeline and its transformer find the same one), under a name of its own.
"""

from __future__ import annotations

from typing import Any

from torch import nn

STEP_CACHE = "_tempocache_step_cache"  # each part's attribute on the transformer, and the name of its hooks
QUANT = "_tempocache_quant"
STREAM = "_tempocache_stream"
REGION = "_tempocache_region"
UNDO = {STEP_CACHE: "call tempocache.disable(...) first",  # how to get a model that copies
        QUANT: "quantization is for good: copy a fresh model, then quantize the copy",
        STREAM: "close() the stream first", REGION: "call tempocache.disable(...) first"}


def copy_refused(what: str, part: str) -> TypeError:
    return TypeError(f"this model has tempocache's {what} on it, which works on the original's modules, not a copy's, "
                     f"and cannot be copied or pickled with it: {UNDO[part]}")


class Attachment:
    """Base of what tempocache attaches: refuses to be copied or pickled with the model, since its hooks and
    replaced layers belong to the model it was attached to, not to a copy."""

    part: str  # STEP_CACHE, QUANT, STREAM or REGION

    def __deepcopy__(self, memo):
        raise copy_refused(type(self).__name__, self.part)

    def __reduce_ex__(self, protocol):
        raise copy_refused(type(self).__name__, self.part)


def transformer_of(obj: Any) -> tuple[nn.Module, Any]:
    """(the transformer, the pipeline or None) of a diffusers pipeline (with a `.transformer`) or a transformer."""
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, nn.Module):
        others = [name for name in ("transformer_2", "unet") if isinstance(getattr(obj, name, None), nn.Module)]
        if others:
            raise ValueError(f"this {type(obj).__name__} has a second denoiser, {others[0]} (e.g. Wan 2.2's low-noise "
                             "expert), which tempocache would leave untouched while it acts on `transformer` alone; "
                             "pipelines with more than one denoiser are not supported yet")
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
