"""Timestep-adaptive mixed precision (6Bit-Diffusion, "Inference-Time Mixed-Precision Quantization
for Video Diffusion Models", 2026).

6Bit-Diffusion's finding: how much a block's output moves away from its input (its
relative input-output difference) predicts, linearly, how much quantizing its linears'
activations hurts at that step. So, per layer l in block b, `calibrate_quant` fits

    error_l ~= a_l + b_l * change_b(previous call)

where error_l is the relative change of block b's output when l alone runs W8A8 instead
of W8A16, and change_b = |out_b - in_b| / |in_b| measured at the previous transformer call
(at the current call it is not known before the block runs); a layer whose error does not
rise with the change is predicted by its mean error instead. How much an error at a step
reaches the final sample depends on the step (later steps partly undo early errors, or
not): calibration also measures, closed-loop, each step's sensitivity, the drift of the
generated samples when that step alone runs fully W8A8, per unit of summed predicted error.
At run time, before each call, a layer runs in 8 bits if its score

    sensitivity(t)^alpha * error estimate_l / multiply-adds_l

is below a threshold, W8A16 otherwise, where the error estimate is one of ESTIMATES: the
predictor above ("change"), the layer's mean error at this step over the calibration
generations ("step": the timestep is known before the call, the block changes are not),
or its mean error over all calls ("mean"). The threshold is set on the calibration calls
so that `budget`, the share of the linears' multiply-adds done in 8 bits over a whole
generation, is met: calls where the blocks are stable and the step is insensitive run more
layers in 8 bits. (0, "mean") ranks the layers once, static mixed precision. Which mix
moves the generated samples least depends on the model and the budget, so calibration runs
each mix of MIXES, closed-loop, at a few budgets and keeps the best; a run uses the mix of
the nearest calibrated budget. The mixes are compared at the 8-bit share static mixed
precision reaches (a whole layer is in 8 bits or not, so it falls short of the budget), not
at the budget: one doing less 8-bit work would win by that alone. The weights are 8-bit
either way.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..closed_loop import ClosedLoop, Run
from ..models import (
    QUANT,
    STEP_CACHE,
    Hook,
    add_hook,
    attached,
    decision_group,
    find_blocks,
    find_profile,
    fingerprint,
    remove_hook,
    summed,
    timestep_of,
    transformer_of,
)
from .linear import Activations, QuantLinear
from .quantize import (
    FilterFn,
    QuantConfig,
    QuantState,
    quantizable_linears,
    replace_linears,
    resolve_format,
    restore_linears,
)

# A layer whose error does not rise with its block's change (correlation below this) is predicted by its mean error:
# a poor fit only adds noise to the ranking.
MIN_CORRELATION = 0.5
ESTIMATES = ("change", "step", "mean")  # a layer's error estimate at a call: see the module's docstring
MIXES = tuple((alpha, estimate) for alpha in (1.0, 0.0) for estimate in ESTIMATES)  # (alpha, estimate)
STATIC_MIX = (0.0, "mean")
MIX_BUDGETS = (0.5, 0.7, 0.9)


@dataclass
class QuantProfile:
    """The fitted predictor: per quantized layer its block, multiply-adds per token and (a, b); per block the first call's change."""

    model: str
    format: str
    layers: list[str]
    blocks: list[int]
    macs: list[int]
    coefficients: list[list[float]]  # (a, b) per layer
    mean_error: list[float]  # per layer, over the calibration calls
    step_error: list[list[float]]  # per layer, its mean error at each calibrated step (order of step_timesteps)
    initial_change: list[float]  # per block, mean over the first calls of the calibration generations
    call_changes: list[list[float]]  # per calibration call, the change of each block the predictor read
    call_timesteps: list[float]  # per calibration call
    step_timesteps: list[float]  # the calibrated steps' timesteps, ascending
    step_sensitivity: list[float]  # per step (same order): output drift per unit of predicted error
    prompts: list[str] = field(default_factory=list)
    fingerprint: str = ""  # of the transformer it was measured on (models.fingerprint)
    mixes: dict[str, list] = field(default_factory=dict)  # per calibrated budget, the (alpha, estimate) that drifted least
    mix_drift: dict[str, list[float]] = field(default_factory=dict)  # per calibrated budget, each of MIXES' drift

    def sensitivity(self, timesteps) -> np.ndarray:
        return np.interp(timesteps, self.step_timesteps, self.step_sensitivity)

    def mix_for(self, budget: float) -> tuple[float, str]:
        """The calibrated mix of the budget nearest `budget`; the predictor alone if none was calibrated."""
        if not self.mixes:
            return MIXES[0]
        return tuple(self.mixes[min(self.mixes, key=lambda b: abs(float(b) - budget))])

    def error_estimate(self, changes: np.ndarray, timesteps: np.ndarray | float, estimate: str) -> np.ndarray:
        """Each layer's (last axis) estimated error for block changes (..., blocks) at timesteps (...)."""
        if estimate == "mean":
            return np.array(self.mean_error)
        if estimate == "step":
            return np.stack([np.interp(timesteps, self.step_timesteps, row) for row in self.step_error], axis=-1)
        coefficients = np.array(self.coefficients)
        return np.maximum(coefficients[:, 0] + coefficients[:, 1] * np.asarray(changes)[..., self.blocks], 0.0)

    def scores(self, changes: np.ndarray, timesteps: np.ndarray | float, mix: tuple[float, str]) -> np.ndarray:
        """Each layer's (last axis) score for block changes (..., blocks) at timesteps (...), per the module's docstring."""
        alpha, estimate = mix
        sensitivity = np.asarray(self.sensitivity(timesteps), dtype=float)[..., None]
        return sensitivity ** alpha * self.error_estimate(changes, timesteps, estimate) / np.array(self.macs, dtype=float)

    def threshold(self, budget: float, mix: tuple[float, str]) -> float:
        """The score under which a layer runs in 8 bits, so that over the calibration calls a `budget` share
        of the multiply-adds does."""
        if budget <= 0:
            return -np.inf
        if budget >= 1:
            return np.inf
        scores = self.scores(np.array(self.call_changes), np.array(self.call_timesteps), mix)  # (calls, layers)
        weights = np.broadcast_to(np.array(self.macs, dtype=float), scores.shape).ravel()
        order = np.argsort(scores.ravel(), kind="stable")
        ranked = scores.ravel()[order]
        last_of_equals = np.append(ranked[1:] != ranked[:-1], True)  # a layer at the threshold runs in 8 bits at every call
        within = (np.cumsum(weights[order]) <= budget * weights.sum() + 1e-9) & last_of_equals
        return float(ranked[within][-1]) if within.any() else -np.inf

    def static_share(self, budget: float) -> float:
        """The 8-bit share static mixed precision runs at `budget`: at most it, as a layer is in 8 bits or not."""
        macs = np.array(self.macs, dtype=float)
        return float(macs[np.array(self.mean_error) / macs <= self.threshold(budget, STATIC_MIX)].sum() / macs.sum())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QuantProfile":
        return cls(**json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class TimestepAdaptive(QuantConfig):
    """Per call and per layer, W8A8 for the layers predicted least sensitive, W8A16 for the rest.

    budget: share of the quantized linears' multiply-adds run in 8 bits over a generation, in [0, 1]
    (1: all, as W8A8); met on the calibration prompts, approached on others (`quant_stats` reports it).
    format: as in `W8A8`. profile: path or `QuantProfile` from `tempocache calibrate --quant-predictor`;
    None: the registered one of this model. per_step: False ranks the layers once, by their mean
    calibrated error, the same at every call: static mixed precision, the baseline this policy has to beat.
    attention: as in `W8A8`, FP8 self-attention at every call (the budget governs the linears).
    """

    budget: float = 0.8
    format: str = "auto"
    profile: str | Path | QuantProfile | None = None
    per_step: bool = True
    attention: bool = False

    def check(self) -> None:
        if not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"TimestepAdaptive budget must be in [0, 1] (share of linear work in 8 bits), got {self.budget}")
        super().check()

    def prepare(self, transformer: nn.Module, fmt: str, layers: list[str]) -> "TimestepAdaptive":
        profile = self.profile
        if not isinstance(profile, QuantProfile):
            path = profile or find_profile("quant", transformer, format=fmt)
            if path is None or not Path(path).exists():
                raise ValueError(f"no {fmt} quantization profile for {type(transformer).__name__}: run `tempocache calibrate "
                                 f"--quant-predictor {fmt}` (or tempocache.calibrate_quant) and pass profile=<its JSON>")
            profile = QuantProfile.load(path)
        if profile.format != fmt:
            raise ValueError(f"the profile was fitted for {profile.format}, but this model is being quantized to {fmt}")
        if profile.layers != layers:
            raise ValueError(f"the profile's {len(profile.layers)} layers do not match the {len(layers)} linears being "
                             f"quantized (fitted on {profile.model}, with its filter); calibrate this model with this filter")
        return replace(self, profile=profile)

    def make_controller(self, state: QuantState) -> "_Controller":
        mix = self.profile.mix_for(self.budget) if self.per_step else STATIC_MIX
        return _Controller(self.profile, self.budget, mix, state.layers, state.transformer)


class _Controller:
    """Sets each layer's precision before every transformer call, from the block changes of the last one."""

    def __init__(self, profile: QuantProfile, budget: float, mix: tuple[float, str], layers: dict[str, QuantLinear],
                 transformer: nn.Module):
        self.profile, self.mix = profile, mix
        self.threshold = profile.threshold(budget, mix)
        self.layers = [layers[name] for name in profile.layers]
        self.macs = np.array(profile.macs, dtype=float)
        self.changes: dict[int, torch.Tensor] = {}
        self.last_timestep: float | None = None
        self.low_macs = self.all_macs = 0.0
        self.transformer = transformer
        blocks = find_blocks(transformer)
        self.blocks = blocks.modules
        if mix[1] == "change":  # the block changes are read only by the predictor
            for index, (block, call) in enumerate(zip(blocks.modules, blocks.calls)):
                add_hook(block, _ChangeHook(self, index, call), QUANT)

    def remove(self) -> None:
        for block in self.blocks:
            remove_hook(block, QUANT)
        # a removed diffusers hook stays in a reference cycle (hook <-> its function references) until the garbage
        # collector runs: it must not keep the 8-bit layers (the weights' memory) alive meanwhile
        self.layers = []

    def decide(self, timestep: float | None) -> None:
        if timestep is None or self.last_timestep is None or timestep > self.last_timestep:
            self.changes = {}  # a new generation: nothing measured yet in it
        self.last_timestep = timestep
        change = np.array(self.profile.initial_change)
        if self.changes:
            measured = sorted(self.changes)
            # every rank's shard of each block, under context parallelism: all ranks pick the same precisions
            sums = summed(torch.stack([self.changes[b] for b in measured]), decision_group(self.transformer))
            change[measured] = (sums[:, 0] / sums[:, 1].clamp(min=1e-24)).sqrt().cpu().numpy()
        t = timestep if timestep is not None else self.profile.step_timesteps[-1]  # no timestep: as at the first step
        low = self.profile.scores(change, t, self.mix) <= self.threshold
        for layer, is_low in zip(self.layers, low):
            layer.low_precision = bool(is_low)
        self.low_macs += self.macs[low].sum()
        self.all_macs += self.macs.sum()

    def low_share(self) -> float:
        return float(self.low_macs / self.all_macs) if self.all_macs else 0.0


class _ChangeHook(Hook):
    def __init__(self, controller: _Controller, index: int, call):
        super().__init__()
        self.controller, self.index, self.call = controller, index, call
        self.state_in = None

    def pre_forward(self, module, *args, **kwargs):
        self.state_in = self.call.state_in(args, kwargs)
        self._args, self._kwargs = args, kwargs
        return args, kwargs

    def post_forward(self, module, output):
        self.controller.changes[self.index] = state_change_sums(self.call.state_out(output, self._args, self._kwargs),
                                                                self.state_in)
        self.state_in = self._args = self._kwargs = None
        return output


def state_change_sums(new: tuple, old: tuple) -> torch.Tensor:
    """(2,) |new - old|^2 and |old|^2 summed over every tensor of a block state (no device sync)."""
    pairs = [(n.float(), o.float()) for n, o in zip(new, old) if n is not None and o is not None]
    return torch.stack([sum((n - o).pow(2).sum() for n, o in pairs), sum(o.pow(2).sum() for _, o in pairs)])


def relative_state_change(new: tuple, old: tuple) -> torch.Tensor:
    """|new - old| / |old| over every tensor of a block state (a 0-d tensor: no device sync)."""
    change, size = state_change_sums(new, old)
    return torch.sqrt(change / size.clamp(min=1e-24))


def calibrate_quant(pipe: Any, prompts: Sequence, run: Run | None = None, format: str = "fp8",
                    mix_budgets: tuple[float, ...] = MIX_BUDGETS, filter_fn: FilterFn | None = None) -> QuantProfile:
    """Fit TimestepAdaptive's predictor on full generations of `prompts` (the model is left as it was).

    Every block call is re-run once per quantized linear in it with that linear alone in W8A8
    (the others W8A16), then each step is probed once with all linears W8A8 at that step alone,
    then each of MIXES runs closed-loop at each of `mix_budgets`: calibration costs about
    (linears per block + 1 + steps + 6 x budgets) generations. `run(pipe, prompt)` makes one
    generation (a "prompt" may be a batch) and returns its samples (see `closed_loop.generated_samples`):
    the mixes and the step sensitivities are measured by how far they move. Runs must be deterministic (the first
    prompt is run twice, and runs that differ are refused).
    `filter_fn` chooses the linears as `quantize`'s does; quantize with the same one.
    """
    return QuantCalibration(pipe, prompts, run, format, filter_fn).fit(mix_budgets)


class QuantCalibration:
    """One calibration of TimestepAdaptive's predictor: the model with its linears in 8 bits (all W8A16 unless a
    probe says otherwise), and what the per-layer pass records."""

    def __init__(self, pipe: Any, prompts: Sequence, run: Run | None, format: str, filter_fn: FilterFn | None):
        self.transformer, _ = transformer_of(pipe)
        self.format = resolve_format(format, next(self.transformer.parameters()).device)
        self.loop = ClosedLoop(pipe, prompts, run)
        for attribute, what in ((QUANT, "it is already quantized"), (STEP_CACHE, "step caching is on")):
            if attached(self.transformer, attribute) is not None:
                raise RuntimeError(f"calibrate_quant needs the unmodified model, but {what}")
        self.found = quantizable_linears(self.transformer, filter_fn)
        self.blocks = find_blocks(self.transformer)
        self.names_in = [[name for name, b in self.found if b == index] for index in range(len(self.blocks))]
        self.errors: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in self.found}  # (change, error) per call
        self.initial: list[list[float]] = [[] for _ in self.blocks.modules]  # each block's change at each generation's first call
        self.call_changes: list[list[float]] = []  # per call, the change of each block its errors were paired with
        self.call_timesteps: list[float] = []
        self.previous: dict[int, float] | None = None  # block changes at the last call of this generation
        self.current: dict[int, float] = {}
        self.last_timestep: float | None = None
        self.busy = False  # while a block is re-run with one linear in W8A8
        self.layers: dict[str, QuantLinear] = {}  # the 8-bit layers, while fit() runs

    def fit(self, mix_budgets: tuple[float, ...]) -> QuantProfile:
        originals, self.layers = replace_linears(self.transformer, [name for name, _ in self.found], self.format, Activations())
        try:
            with torch.no_grad():
                # first, so that a run returning no samples fails before the long pass
                self.loop.exact = self.loop.generate(self.precision(all_low_at=None))
                self.loop.check_deterministic(self.precision(all_low_at=None))
                self.record_layer_errors()
                steps = sorted(set(self.call_timesteps))
                errors = np.array([[e for _, e in self.errors[name]] for name, _ in self.found])  # (layers, calls)
                at_step = np.array([[t == step for t in self.call_timesteps] for step in steps], dtype=float)  # (steps, calls)
                sensitivity = self.loop.sensitivities(steps, lambda t: self.precision(all_low_at=t),
                                                      (errors.sum(0)[None] * at_step).sum(1))
                profile = self.profile(errors, at_step, steps, sensitivity)
                for budget in mix_budgets:  # every mix at the share static mixed precision reaches: equal 8-bit work
                    share = profile.static_share(budget)
                    best, drifts = self.loop.least_drift(MIXES, lambda mix: self.controlled(profile, share, mix))
                    profile.mixes[str(budget)] = list(best)
                    profile.mix_drift[str(budget)] = drifts
        finally:
            restore_linears(self.transformer, originals)
        return profile

    def precision(self, all_low_at: float | None) -> ContextManager[None]:
        """Every linear in W8A8 at the calls of timestep `all_low_at`, W8A16 at the others."""
        def pick(t: float | None) -> None:
            for layer in self.layers.values():
                layer.low_precision = t == all_low_at
        return _before_each_call(self.transformer, pick)

    @contextlib.contextmanager
    def controlled(self, profile: QuantProfile, budget: float, mix: tuple[float, str]) -> Iterator[None]:
        controller = _Controller(profile, budget, mix, self.layers, self.transformer)
        try:
            with _before_each_call(self.transformer, controller.decide):
                yield
        finally:
            controller.remove()

    def record_layer_errors(self) -> None:
        """The full-precision (W8A16) generations, re-running each block call once per linear in it in W8A8."""
        handles = [self.transformer.register_forward_pre_hook(self.on_call, with_kwargs=True)]
        handles += [block.register_forward_hook(self.on_block(i), with_kwargs=True) for i, block in enumerate(self.blocks.modules)]
        try:
            with self.precision(all_low_at=None):
                for prompt in self.loop.prompts:
                    self.loop.run(self.loop.pipe, prompt)
                    self.last_timestep = None
        finally:
            for handle in handles:
                handle.remove()

    def on_call(self, module, args, kwargs) -> None:
        t = timestep_of(module, args, kwargs)
        if t is None:
            raise ValueError(f"calibrate_quant needs the timestep of each {type(module).__name__} call; it got none")
        new_generation = self.last_timestep is None or t > self.last_timestep
        self.last_timestep, self.previous, self.current = t, None if new_generation else self.current, {}
        self.call_changes.append([0.0] * len(self.blocks))
        self.call_timesteps.append(t)

    def on_block(self, index: int) -> Callable:
        call = self.blocks.calls[index]

        def hook(module, args, kwargs, output):
            if self.busy:
                return
            state_in, exact = call.state_in(args, kwargs), call.state_out(output, args, kwargs)
            change = float(relative_state_change(exact, state_in))
            self.current[index] = change
            if self.previous is None:
                self.initial[index].append(change)
            x = change if self.previous is None else self.previous.get(index, change)
            self.call_changes[-1][index] = x
            self.busy = True
            try:
                for name in self.names_in[index]:
                    self.layers[name].low_precision = True
                    approx = call.state_out(module(*args, **kwargs), args, kwargs)
                    self.layers[name].low_precision = False
                    self.errors[name].append((x, float(relative_state_change(approx, exact))))
            finally:
                self.busy = False
        return hook

    def profile(self, errors: np.ndarray, at_step: np.ndarray, steps: list[float], sensitivity: list[float]) -> QuantProfile:
        coefficients, mean_error = [], []
        for name, _ in self.found:
            x, e = np.array(self.errors[name]).T
            slope, intercept = 0.0, float(e.mean())
            if np.ptp(x) > 0 and np.ptp(e) > 0 and np.corrcoef(x, e)[0, 1] >= MIN_CORRELATION:
                slope, intercept = np.polyfit(x, e, 1)
            coefficients.append([float(intercept), float(slope)])
            mean_error.append(float(e.mean()))
        return QuantProfile(
            model=type(self.transformer).__name__, fingerprint=fingerprint(self.transformer), format=self.format,
            layers=[name for name, _ in self.found], blocks=[b for _, b in self.found],
            macs=[self.layers[name].macs_per_token for name, _ in self.found], coefficients=coefficients,
            mean_error=mean_error, step_error=((errors @ at_step.T) / at_step.sum(1)).tolist(),
            initial_change=[float(np.mean(changes)) for changes in self.initial], call_changes=self.call_changes,
            call_timesteps=self.call_timesteps, step_timesteps=steps, step_sensitivity=[float(s) for s in sensitivity],
            prompts=[str(p) for p in self.loop.prompts])


@contextlib.contextmanager
def _before_each_call(transformer: nn.Module, decide: Callable[[float | None], None]) -> Iterator[None]:
    """`decide(timestep)` before each transformer call, inside the `with` block."""
    hook = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: decide(timestep_of(module, args, kwargs)), with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
