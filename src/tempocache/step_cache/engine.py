"""The step-cache engine: diffusers hooks on a transformer and its blocks, driven by a policy.

One hook on the transformer works out which generation, step and CFG branch a call
belongs to; one hook per block computes it, or stands in for its whole segment with
the policy's reused or forecast residual. The model's own code is untouched.

A generation that did not finish must not leak into the next one, so a new one starts
(everything cached forgotten) on any of: a call that raised; the pipeline's scheduler
setting new timesteps (every diffusers pipeline does as it starts); the pipeline ending
it (`maybe_free_model_hooks`); a branch called again at a timestep not below its last (where
no step index is given), a step index that did not advance, a new input shape, or a new branch
joining at a timestep other than the step under way. Calls no cache context names are told
apart by their conditioning, never by their order, so an interrupted step cannot cross them.

The step count policies plan for is the one the running generation will take: what the
call's cache context says, else what the scheduler that announced this generation will run
from its begin index (img2img strength, a user's `timesteps=`), else the config's; never a
scheduler that did not start this generation.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..models import (
    REGION,
    STEP_CACHE,
    Attachment,
    BlockCall,
    ContextHook,
    Hook,
    add_hook,
    attach,
    attached,
    check_parallel,
    claim_cache,
    conditioning_key,
    decision_group,
    detach,
    find_blocks,
    hidden_states_of,
    release_cache,
    remove_hook,
    require_attached,
    timestep_of,
    transformer_of,
)
from .policy import Action, BranchMemory, SegmentMemory, Step, StepCacheConfig, add, sub

@dataclass
class Stats:
    """What the engine counted since it was enabled or reset."""

    calls: int = 0
    full_calls: int = 0  # calls that computed every block
    skipped_calls: int = 0  # calls the policy answered without running the transformer
    generations: int = 0
    blocks_computed: int = 0
    blocks_reused: int = 0
    blocks_forecast: int = 0
    peak_cache_bytes: int = 0

    @property
    def block_calls(self) -> int:
        return self.blocks_computed + self.blocks_reused + self.blocks_forecast

    @property
    def compute_fraction(self) -> float:
        return self.blocks_computed / self.block_calls if self.block_calls else 1.0


class StepCacheEngine(Attachment):
    part = STEP_CACHE

    def __init__(self, transformer: nn.Module, config: StepCacheConfig, pipe: Any = None):
        self.config = config
        self.policy = config.make_policy(transformer)
        blocks = find_blocks(transformer)
        self.family, self.calls = blocks.family, blocks.calls
        self.policy.check(len(blocks))
        self.edges = self.policy.boundaries(len(blocks))
        self.segment_of = [next(k for k in range(len(self.edges) - 1) if self.edges[k] <= i < self.edges[k + 1])
                           for i in range(len(blocks))]
        self.pipe = pipe
        self.transformer = transformer
        self.branches: dict[str, BranchMemory] = {}
        self.current: tuple[Step, BranchMemory] | None = None
        self._last_timestep: float | None = None
        self._unnamed: dict[tuple, str] = {}  # conditioning of calls no context names -> their branch
        self._timesteps = self._scheduler_timesteps()  # the scheduler's at the last call: new ones start a generation
        self._generation_steps: int | None = None  # steps the scheduler that started this generation will run
        self.reset()
        self.hook = _TransformerHook(self)
        add_hook(transformer, self.hook, STEP_CACHE)
        for i, block in enumerate(blocks.modules):
            add_hook(block, _BlockHook(self, i), STEP_CACHE)

    @property
    def num_blocks(self) -> int:
        return len(self.calls)

    def forget(self) -> None:
        """Drop every cached value (diffusers pipelines call this at the end of each generation)."""
        self.branches = {}
        self._unnamed = {}
        self._last_timestep = None

    def reset(self) -> None:
        """Forget every cached value and zero the counters."""
        self.forget()
        self.counts = Stats()

    def remove(self) -> None:
        remove_hook(self.transformer, STEP_CACHE, recurse=True)

    def cache_bytes(self) -> int:
        return sum(b.nbytes() for b in self.branches.values())

    def stats(self) -> dict:
        c = self.counts
        return {"policy": type(self.config).__name__, "family": self.family, **asdict(c), "block_calls": c.block_calls,
                "compute_fraction": c.compute_fraction, "cache_bytes": self.cache_bytes()}

    def begin_call(self, args: tuple, kwargs: dict) -> tuple[Step, BranchMemory]:
        """Place a transformer call in its generation, step and branch."""
        t = timestep_of(self.transformer, args, kwargs)
        if t is None:
            raise TypeError(f"{type(self.transformer).__name__} was called without a timestep; the step cache needs one")
        timesteps = self._scheduler_timesteps()
        announced = timesteps is not None and timesteps is not self._timesteps
        self._timesteps = timesteps
        if announced:
            self.forget()
        context = self.hook.cache_context
        key = None if context is not None else conditioning_key(self.transformer, args, kwargs)
        name = context.name if context is not None else self._unnamed.get(key, f"call{len(self._unnamed)}")
        shape = tuple(hidden_states_of(self.transformer, args, kwargs).shape)
        branch = self.branches.get(name)
        step_index = getattr(context, "step_index", None)
        if branch is None:  # a branch joins only the step under way
            restarted = bool(self.branches) and t != self._last_timestep
        elif step_index is None:  # one call per branch and step, so the same timestep again is a new generation
            restarted = t >= branch.timestep or shape != branch.shape
        else:
            restarted = t > branch.timestep or shape != branch.shape or step_index <= branch.index
        self._last_timestep = t
        if restarted or not self.branches:
            check_parallel(self.transformer)  # parallelism may have been enabled after the cache
            self.branches, self._unnamed = {}, {}
            self.counts.generations += 1
            self._generation_steps = self._scheduled_steps() if announced else None
        if key is not None:
            name = self._unnamed.setdefault(key, f"call{len(self._unnamed)}")
        if name not in self.branches:
            self.branches[name] = BranchMemory([SegmentMemory() for _ in range(len(self.edges) - 1)], self.policy.new_state())
        branch = self.branches[name]
        branch.index = step_index if step_index is not None else branch.index + 1
        branch.timestep, branch.shape = t, shape
        num_steps = getattr(context, "num_inference_steps", None) or self._generation_steps or self.policy.num_steps
        unknown = ""
        if num_steps is None and self._timesteps is not None:
            unknown = (f"a pipeline other than the one tempocache was enabled on, or a loop of its own, runs this "
                       f"{type(self.transformer).__name__}: that pipeline's scheduler did not start this generation")
        return Step(branch.index, num_steps, t, name, unknown, decision_group(self.transformer)), branch

    def _scheduler_timesteps(self):
        return getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)

    def _scheduled_steps(self) -> int:
        """Model calls per branch the scheduler will run: its timesteps from its begin index (img2img starts late)."""
        begin = getattr(self.pipe.scheduler, "begin_index", None) or 0
        return len(self._timesteps) - begin

    def end_call(self) -> None:
        self.current = None
        self.counts.peak_cache_bytes = max(self.counts.peak_cache_bytes, self.cache_bytes())


class _TransformerHook(ContextHook):
    def __init__(self, engine: StepCacheEngine):
        super().__init__()
        self.engine = engine

    # Dynamo skips this frame only, and traces the forward it calls: no resume function after a graph break here,
    # which would be compiled again the first time a call is answered by a stand-in.
    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: nn.Module, *args, **kwargs):
        try:
            output = self._begin(args, kwargs)
            if output is None:
                output = self.original(*args, **kwargs)
                self._end(output)
            return output
        except BaseException:
            self.engine.forget()  # this generation is broken: nothing of it may reach the next one
            raise
        finally:
            self.engine.end_call()

    # The engine's bookkeeping stays out of torch.compile's graphs (it would guard on every counter and graph-break
    # on the timestep's float); the model's own computation between them is traced as usual.
    @torch.compiler.disable
    def _begin(self, args: tuple, kwargs: dict):
        """Place the call; the policy's stand-in output for the whole call, or None to run it."""
        engine = self.engine
        step, branch = engine.begin_call(args, kwargs)
        engine.policy.check_step(step)
        engine.counts.calls += 1
        output = engine.policy.call_output(step, engine.branches)
        if output is not None:
            engine.counts.skipped_calls += 1
            engine.counts.blocks_reused += engine.num_blocks
            return output
        engine.current = (step, branch)
        self._computed_before = engine.counts.blocks_computed
        return None

    @torch.compiler.disable
    def _end(self, output) -> None:
        engine = self.engine
        step, _ = engine.current
        if engine.counts.blocks_computed - self._computed_before == engine.num_blocks:
            engine.counts.full_calls += 1
        engine.policy.call_done(step, engine.branches, output)

    def on_reset(self) -> None:
        self.engine.forget()  # keep the counters: stats() after pipe(...) should still tell


class _BlockHook(Hook):
    def __init__(self, engine: StepCacheEngine, index: int):
        super().__init__()
        self.engine = engine
        self.index = index
        self.call: BlockCall = engine.calls[index]

    @torch.compiler.disable(recursive=False)  # as _TransformerHook.new_forward
    def new_forward(self, module: nn.Module, *args, **kwargs):
        stand_in = self._stand_in(args, kwargs)
        if stand_in is not None:
            return stand_in
        output = self.original(*args, **kwargs)
        self._computed(output, args, kwargs)
        return output

    @torch.compiler.disable
    def _stand_in(self, args: tuple, kwargs: dict):
        """The block's output where its segment is not computed at this step (reused or forecast), else None."""
        engine, i, call = self.engine, self.index, self.call
        if engine.current is None:  # called outside the transformer's forward
            return None
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
                return None
            if action is Action.REUSE:
                engine.counts.blocks_reused += end - start
            else:
                engine.counts.blocks_forecast += end - start
            return call.pack(add(x, engine.policy.approximate(step, segment, action, branch)))
        if branch.actions[segment] is not Action.COMPUTE:
            return call.pack(call.state_in(args, kwargs))  # the segment's output was already given at its start
        return None

    @torch.compiler.disable
    def _computed(self, output, args: tuple, kwargs: dict) -> None:
        engine, i, call = self.engine, self.index, self.call
        if engine.current is None:
            return
        step, branch = engine.current
        segment = engine.segment_of[i]
        memory = branch.segments[segment]
        engine.counts.blocks_computed += 1
        if call.output_order == "infer":  # generic fallback: learn this block's output layout before it is ever skipped
            call.state_out(output, args, kwargs)
        if i == engine.edges[segment + 1] - 1:
            x_in, branch.segment_input = branch.segment_input, None
            x_out = call.state_out(output, args, kwargs)
            residual = tuple(None if r is None else r.detach() for r in sub(x_out, x_in))
            memory.history = [*memory.history, (step.index, residual)][-engine.policy.history:]
            if engine.policy.keeps_inputs:
                memory.input = x_in
            engine.policy.computed(step, segment, x_in, x_out, branch)


def enable(pipe_or_transformer: Any, config: StepCacheConfig) -> StepCacheEngine:
    """Turn on step caching with `config` (a policy config, e.g. `FirstBlockCache(threshold=0.1)`), or region-aware
    editing with `RegionE(...)` on an editing pipeline."""
    from ..region import RegionE, enable_region

    if isinstance(config, RegionE):
        engine = enable_region(pipe_or_transformer, config)
        claim_cache(engine.transformer, config)
        return engine
    transformer, pipe = transformer_of(pipe_or_transformer)
    if attached(transformer, REGION) is not None:
        raise RuntimeError("RegionE is enabled on this transformer and carries its own velocity cache: a step cache "
                           "does not stack on it; call tempocache.disable() first")
    if isinstance(config, type) and issubclass(config, StepCacheConfig):
        raise TypeError(f"config must be a config object, got the class {config.__name__}: pass {config.__name__}()")
    if not isinstance(config, StepCacheConfig):
        raise TypeError(f"config must be a tempocache step-cache config (e.g. tempocache.Auto(budget=0.33)), "
                        f"got {type(config).__name__}")
    if (existing := attached(transformer, STEP_CACHE)) is not None:
        raise RuntimeError(f"step caching is already enabled on this {type(transformer).__name__} "
                           f"({type(existing.config).__name__}); call tempocache.disable() first")
    if getattr(transformer, "is_cache_enabled", False):
        raise RuntimeError(f"a diffusers cache is enabled on this {type(transformer).__name__}; call transformer.disable_cache() first")
    check_parallel(transformer)
    engine = StepCacheEngine(transformer, config, pipe)
    attach(transformer, STEP_CACHE, engine)
    claim_cache(transformer, config)
    return engine


def check_config(pipe_or_transformer: Any, config: StepCacheConfig, num_steps: int) -> None:
    """Raise, before any compute, what `config` would raise at the first call of a generation of `num_steps` steps."""
    transformer, _ = transformer_of(pipe_or_transformer)
    policy = config.make_policy(transformer)
    policy.check(len(find_blocks(transformer)))
    policy.check_step(Step(0, num_steps, 0.0, "cond"))


@contextlib.contextmanager
def enabled(pipe_or_transformer: Any, config: StepCacheConfig) -> Iterator[StepCacheEngine]:
    """Step caching with `config` inside a `with` block, disabled when it ends (also on an error)."""
    engine = enable(pipe_or_transformer, config)
    try:
        yield engine
    finally:
        disable(pipe_or_transformer)


def engine_of(pipe_or_transformer: Any) -> StepCacheEngine:
    """The step cache, or RegionE, enabled on the transformer."""
    return attached(pipe_or_transformer, REGION) or require_attached(
        pipe_or_transformer, STEP_CACHE, "step caching is not enabled on this {name}; call tempocache.enable() first")


def disable(pipe_or_transformer: Any) -> None:
    """Remove step caching (or RegionE); the model is exactly as it was."""
    engine = engine_of(pipe_or_transformer)
    engine.remove()
    detach(engine.transformer, engine.part)
    release_cache(engine.transformer, engine.config)


def stats(pipe_or_transformer: Any) -> dict:
    """Calls and block calls computed, reused and forecast since enable (or the last reset); cache bytes held."""
    return engine_of(pipe_or_transformer).stats()


def reset(pipe_or_transformer: Any) -> None:
    """Forget all cached values and counters (a new generation also resets the cache by itself)."""
    engine_of(pipe_or_transformer).reset()
