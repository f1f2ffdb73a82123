"""The one place tempocache touches diffusers' hook internals.

tempocache installs its behaviour as diffusers `ModelHook`s, as diffusers' own caches do, and
relies on these things diffusers does not document as public:
- `HookRegistry.check_if_exists_or_initialize(module)`, its `register_hook` and `remove_hook`;
- a hook's `fn_ref.original_forward`, the forward it wraps;
- pipelines' `transformer.cache_context(name, step_index=..., ...)` reaching, through
  `_set_cache_context`, every `StateManager` attribute of a hook whose `_is_stateful` is set;
- `_reset_stateful_cache()` (what `DiffusionPipeline.maybe_free_model_hooks` calls) reaching
  such a hook's `reset_state`;
- `CacheMixin.enable_cache` refusing while `_cache_config` is set, which `claim_cache` uses so
  that a diffusers cache is not stacked on tempocache's;
- the names its context-parallel hooks register under (`cp_input---...`, `cp_output---...`) and the
  registry's `_hook_order`, so that `add_hook` keeps those hooks outermost.
`check_internals` exercises them on throwaway modules before the first hook is installed,
and raises, naming the diffusers version, if any of them changed.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import diffusers
import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, ModelHook
from diffusers.hooks.context_parallel import (_CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE,
                                              _CONTEXT_PARALLEL_OUTPUT_HOOK_TEMPLATE)
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager, _set_cache_context
from diffusers.models.cache_utils import CacheMixin
from torch import nn

from .attach import copy_refused

TESTED_WITH = "0.42.1"


class Hook(ModelHook):
    """A diffusers ModelHook; `original(...)` runs the forward it wraps. Copying or pickling a module it is on is
    refused, in words naming the tempocache part (`add_hook`'s name) that installed it."""

    part: str  # set by add_hook

    def original(self, *args, **kwargs):
        return self.fn_ref.original_forward(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        raise copy_refused(f"{type(self).__name__} hook", self.part)


class _ContextReceiver(StateManager):
    """diffusers hands the pipeline's cache context to stateful hooks' StateManagers: this one just keeps it."""

    def __init__(self):
        super().__init__(BaseState)
        self.current: CacheContext | None = None

    def set_context(self, context: CacheContext | None) -> None:
        self.current = context


class ContextHook(Hook):
    """A hook that sees the pipeline's `cache_context(...)` as `self.cache_context`, and whose `on_reset` runs when
    the pipeline frees its stateful hooks at the end of a generation."""

    _is_stateful = True

    def __init__(self):
        super().__init__()
        self._receiver = _ContextReceiver()

    @property
    def cache_context(self) -> CacheContext | None:
        return self._receiver.current

    def on_reset(self) -> None:
        """Called when diffusers resets stateful hooks."""

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.on_reset()
        return module


CONTEXT_PARALLEL_HOOKS = tuple(t.split("{")[0] for t in (_CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE,
                                                          _CONTEXT_PARALLEL_OUTPUT_HOOK_TEMPLATE))


def add_hook(module: nn.Module, hook: Hook, part: str) -> None:
    """Install `hook` on `module` under the name of the tempocache part it belongs to (STEP_CACHE or QUANT).

    diffusers' context-parallel hooks (`enable_parallelism`) split a module's inputs across ranks and gather its
    outputs: `hook` goes inside them, as if parallelism were enabled last, so that tempocache sees and
    keeps the shard each rank computes whichever was enabled first."""
    check_internals()
    hook.part = part
    registry = HookRegistry.check_if_exists_or_initialize(module)
    order = registry._hook_order
    first = next((i for i, name in enumerate(order) if name.startswith(CONTEXT_PARALLEL_HOOKS)), len(order))
    outer = [(name, registry.get_hook(name)) for name in order[first:]]
    for name, _ in reversed(outer):  # outermost first: removing the last hook restores the forward it wrapped
        registry.remove_hook(name, recurse=False)
    registry.register_hook(hook, part)
    for name, kept in outer:
        registry.register_hook(kept, name)


def remove_hook(module: nn.Module, name: str, recurse: bool = False) -> None:
    HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=recurse)


def claim_cache(transformer: nn.Module, owner: object) -> None:
    """While `owner` (tempocache's config) caches `transformer`, diffusers' `transformer.enable_cache(...)` refuses,
    naming it, instead of stacking a second cache on the same blocks."""
    if isinstance(transformer, CacheMixin):
        transformer._cache_config = owner


def release_cache(transformer: nn.Module, owner: object) -> None:
    if isinstance(transformer, CacheMixin) and transformer._cache_config is owner:
        transformer._cache_config = None


@contextlib.contextmanager
def cache_context(transformer: nn.Module, name: str, **where) -> Iterator[None]:
    """`transformer.cache_context(name, ...)`, also for models without diffusers' CacheMixin (PixArt, DiT)."""
    if hasattr(transformer, "cache_context"):
        with transformer.cache_context(name, **where):
            yield
        return
    _set_cache_context(transformer, CacheContext(name, **where))
    try:
        yield
    finally:
        _set_cache_context(transformer, None)


@functools.cache
def check_internals() -> None:
    """Raise RuntimeError if diffusers' hook internals no longer behave as this module expects."""
    try:
        _exercise_internals()
    except Exception as error:
        raise RuntimeError(
            f"tempocache relies on diffusers' hook internals (see tempocache/models/hooks.py) and was tested with "
            f"diffusers {TESTED_WITH}; with diffusers {diffusers.__version__} they changed: {error}"
        ) from error


def _exercise_internals() -> None:
    seen = {"resets": 0, "forwards": 0}

    class Probe(ContextHook):
        def new_forward(self, module, *args, **kwargs):
            seen["forwards"] += 1
            seen["context"] = self.cache_context
            return self.original(*args, **kwargs)

        def on_reset(self):
            seen["resets"] += 1

    module, probe = nn.Linear(1, 1), Probe()
    HookRegistry.check_if_exists_or_initialize(module).register_hook(probe, "probe")
    _set_cache_context(module, CacheContext("cond", step_index=3, num_inference_steps=7))
    module(torch.zeros(1, 1))
    context = seen.get("context")
    if context is None or (context.name, context.step_index, context.num_inference_steps) != ("cond", 3, 7):
        raise AssertionError(f"_set_cache_context did not reach a stateful hook's StateManager (it saw {context!r})")
    _set_cache_context(module, None)
    HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks()
    if seen["resets"] != 1:
        raise AssertionError("HookRegistry.reset_stateful_hooks did not call the stateful hook's reset_state")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if registry._hook_order != ["probe"]:
        raise AssertionError(f"HookRegistry._hook_order does not list the hooks in order ({registry._hook_order!r})")
    registry.remove_hook("probe", recurse=False)
    module(torch.zeros(1, 1))
    if seen["forwards"] != 1:
        raise AssertionError("remove_hook left the hook in place")

    class Cached(nn.Linear, CacheMixin):
        pass

    cached = Cached(1, 1)
    claim_cache(cached, probe)
    try:
        cached.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    except ValueError:
        pass
    else:
        raise AssertionError("CacheMixin.enable_cache no longer refuses while _cache_config is set")
    release_cache(cached, probe)
    if cached.is_cache_enabled:
        raise AssertionError("CacheMixin.is_cache_enabled no longer reads _cache_config")
