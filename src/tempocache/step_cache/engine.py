"""The step-cache engine: diffusers hooks on a transformer and its blocks, driven by a policy.

One hook on the transformer works out which generation, step and CFG branch a call
belongs to; one hook per block computes it, or stands in for its whole segment with
the policy's reused or forecast residual. The model's own code is untouched.
"""

from __future__ import annotations

from typing import Any

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch import nn

from .adapters import BlockCall, find_blocks, hidden_states_of, timestep_of
from .policy import Action, BranchMemory, SegmentMemory, Step, add, sub

HOOK_NAME = "tempocache_step_cache"


class _ContextReceiver(StateManager):
    """Receives the pipeline's `cache_context(name, step_index=..., ...)`: diffusers hands it to stateful hooks' StateManagers."""

    def __init__(self):
        super().__init__(BaseState)
        self.current = None

    def set_context(self, context) -> None:
        self.current = context


class StepCacheEngine:
    def __init__(self, transformer: nn.Module, config: Any, pipe: Any = None):
        self.config = config
        self.policy = config.make_policy(transformer)
        self.family, blocks, self.calls = find_blocks(transformer)
        self.policy.check(len(blocks))
        self.edges = self.policy.boundaries(len(blocks))
        self.segment_of = [next(k for k in range(len(self.edges) - 1) if self.edges[k] <= i < self.edges[k + 1]) for i in range(len(blocks))]
        self.pipe = pipe
        self.transformer = transformer
        self.context = _ContextReceiver()
        self.branches: dict[str, BranchMemory] = {}
        self.current: tuple[Step, BranchMemory] | None = None
        self._last_timestep: float | None = None
        self._ordinal = 0
        self.reset()
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_TransformerHook(self), HOOK_NAME)
        for i, block in enumerate(blocks):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockHook(self, i), HOOK_NAME)

    @property
    def num_blocks(self) -> int:
        return len(self.calls)

    def forget(self) -> None:
        """Drop every cached value (diffusers pipelines call this at the end of each generation)."""
        self.branches = {}
        self._last_timestep = None

    def reset(self) -> None:
        """Forget every cached value and zero the counters."""
        self.forget()
        self.counts = {"calls": 0, "full_calls": 0, "skipped_calls": 0, "generations": 0,
                       "blocks_computed": 0, "blocks_reused": 0, "blocks_forecast": 0}
        self.peak_cache_bytes = 0

    def remove(self) -> None:
        HookRegistry.check_if_exists_or_initialize(self.transformer).remove_hook(HOOK_NAME, recurse=True)

    def stats(self) -> dict:
        c = self.counts
        blocks = c["blocks_computed"] + c["blocks_reused"] + c["blocks_forecast"]
        return {
            "policy": type(self.config).__name__,
            "family": self.family,
            **c,
            "block_calls": blocks,
            "compute_fraction": c["blocks_computed"] / blocks if blocks else 1.0,
            "cache_bytes": sum(b.nbytes() for b in self.branches.values()),
            "peak_cache_bytes": self.peak_cache_bytes,
        }

    def begin_call(self, args: tuple, kwargs: dict) -> tuple[Step, BranchMemory]:
        """Place a transformer call in its generation, step and branch."""
        t = timestep_of(self.transformer, args, kwargs)
        if t is None:
            raise TypeError(f"{type(self.transformer).__name__} was called without a timestep; the step cache needs one")
        context = self.context.current
        if context is not None:
            name = context.name
        else:  # no names given: calls at the same timestep are the CFG branches, in order
            self._ordinal = self._ordinal + 1 if t == self._last_timestep else 0
            name = f"call{self._ordinal}"
        self._last_timestep = t
        shape = tuple(hidden_states_of(self.transformer, args, kwargs).shape)
        branch = self.branches.get(name)
        step_index = getattr(context, "step_index", None)
        restarted = branch is not None and (
            t > branch.timestep or shape != branch.shape or (step_index is not None and step_index <= branch.index)
        )
        if restarted or not self.branches:
            self.branches = {}
            self.counts["generations"] += 1
        if name not in self.branches:
            self.branches[name] = BranchMemory([SegmentMemory() for _ in range(len(self.edges) - 1)])
        branch = self.branches[name]
        branch.index = step_index if step_index is not None else branch.index + 1
        branch.timestep, branch.shape = t, shape
        num_steps = getattr(context, "num_inference_steps", None) or self._scheduler_steps() or getattr(self.config, "num_steps", None)
        return Step(branch.index, num_steps, t, name), branch

    def _scheduler_steps(self) -> int | None:
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        return len(timesteps) if timesteps is not None else None

    def end_call(self) -> None:
        self.current = None
        self.peak_cache_bytes = max(self.peak_cache_bytes, sum(b.nbytes() for b in self.branches.values()))


class _TransformerHook(ModelHook):
    _is_stateful = True  # so that diffusers delivers cache_context to `engine.context`

    def __init__(self, engine: StepCacheEngine):
        super().__init__()
        self.engine = engine
        self.context = engine.context

    def new_forward(self, module: nn.Module, *args, **kwargs):
        engine = self.engine
        step, branch = engine.begin_call(args, kwargs)
        engine.policy.check_step(step)
        engine.counts["calls"] += 1
        output = engine.policy.call_output(step, engine.branches)
        if output is not None:
            engine.counts["skipped_calls"] += 1
            engine.counts["blocks_reused"] += engine.num_blocks
            return output
        engine.current = (step, branch)
        computed_before = engine.counts["blocks_computed"]
        try:
            output = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            engine.end_call()
        if engine.counts["blocks_computed"] - computed_before == engine.num_blocks:
            engine.counts["full_calls"] += 1
        engine.policy.call_done(step, engine.branches, output)
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.engine.forget()  # keep the counters: stats() after pipe(...) should still tell
        return module


class _BlockHook(ModelHook):
    def __init__(self, engine: StepCacheEngine, index: int):
        super().__init__()
        self.engine = engine
        self.index = index
        self.call: BlockCall = engine.calls[index]

    def new_forward(self, module: nn.Module, *args, **kwargs):
        engine, i, call = self.engine, self.index, self.call
        if engine.current is None:  # called outside the transformer's forward
            return self.fn_ref.original_forward(*args, **kwargs)
        step, branch = engine.current
        segment = engine.segment_of[i]
        start, end = engine.edges[segment], engine.edges[segment + 1]
        memory = branch.segments[segment]
        if i == 0:
            branch.temb = call.temb(args, kwargs)
        if i == start:
            x = call.state_in(args, kwargs)
            action = engine.policy.decide(step, segment, x, branch) if memory.history else Action.COMPUTE
            branch.actions[segment] = action
            if action is Action.COMPUTE:
                branch.segment_input = x
            else:
                engine.counts["blocks_reused" if action is Action.REUSE else "blocks_forecast"] += end - start
                return call.pack(add(x, engine.policy.approximate(step, segment, action, branch)))
        elif branch.actions[segment] is not Action.COMPUTE:
            return call.pack(call.state_in(args, kwargs))  # the segment's output was already given at its start
        output = self.fn_ref.original_forward(*args, **kwargs)
        engine.counts["blocks_computed"] += 1
        if call.output_order == "infer":  # generic fallback: learn this block's output layout before it is ever skipped
            call.state_out(output, args, kwargs)
        if i == end - 1:
            x_in, branch.segment_input = branch.segment_input, None
            x_out = call.state_out(output, args, kwargs)
            residual = tuple(None if r is None else r.detach() for r in sub(x_out, x_in))
            memory.history = [*memory.history, (step.index, residual)][-engine.policy.history:]
            if engine.policy.keeps_inputs:
                memory.input = x_in
            engine.policy.computed(step, segment, x_in, x_out, branch)
        return output


def _transformer_of(obj: Any) -> tuple[nn.Module, Any]:
    transformer = getattr(obj, "transformer", None)
    if isinstance(transformer, nn.Module):
        return transformer, obj
    if isinstance(obj, nn.Module):
        return obj, None
    raise TypeError(f"expected a diffusers pipeline (with a .transformer) or a transformer module, got {type(obj).__name__}")


def enable(pipe_or_transformer: Any, config: Any) -> StepCacheEngine:
    """Turn on step caching with `config` (a policy config, e.g. `FirstBlockCache(threshold=0.1)`)."""
    transformer, pipe = _transformer_of(pipe_or_transformer)
    if not hasattr(config, "make_policy"):
        raise TypeError(f"config must be a tempocache step-cache config (e.g. tempocache.Auto(budget=0.33)), got {type(config).__name__}")
    if getattr(transformer, "_tempocache_step_cache", None) is not None:
        raise RuntimeError(f"step caching is already enabled on this {type(transformer).__name__} "
                           f"({type(transformer._tempocache_step_cache.config).__name__}); call tempocache.disable() first")
    if getattr(transformer, "is_cache_enabled", False):
        raise RuntimeError(f"a diffusers cache is enabled on this {type(transformer).__name__}; call transformer.disable_cache() first")
    engine = StepCacheEngine(transformer, config, pipe)
    transformer._tempocache_step_cache = engine
    return engine


def attached(pipe_or_transformer: Any, attribute: str, missing: str) -> Any:
    """What tempocache attached to the transformer as `attribute`; if nothing, a RuntimeError saying `missing`
    (its {name} is the transformer's class name)."""
    transformer, _ = _transformer_of(pipe_or_transformer)
    found = getattr(transformer, attribute, None)
    if found is None:
        raise RuntimeError(missing.format(name=type(transformer).__name__))
    return found


def engine_of(pipe_or_transformer: Any) -> StepCacheEngine:
    return attached(pipe_or_transformer, "_tempocache_step_cache",
                    "step caching is not enabled on this {name}; call tempocache.enable() first")


def disable(pipe_or_transformer: Any) -> None:
    """Remove step caching; the model is exactly as it was."""
    engine = engine_of(pipe_or_transformer)
    engine.remove()
    del engine.transformer._tempocache_step_cache


def stats(pipe_or_transformer: Any) -> dict:
    """Calls and block calls computed, reused and forecast since enable (or the last reset); cache bytes held."""
    return engine_of(pipe_or_transformer).stats()


def reset(pipe_or_transformer: Any) -> None:
    """Forget all cached values and counters (a new generation also resets the cache by itself)."""
    engine_of(pipe_or_transformer).reset()
