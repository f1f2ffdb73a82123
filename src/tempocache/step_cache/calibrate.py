"""`calibrate`: a model's step-cache profile, from full-compute generations and closed-loop runs.

Full compute on a few prompts, recording at every step and for every segment of the
block stack the segment's residual (on a fixed sample of tokens), gives the error tables
(`_tabulate`). Closed-loop runs (`closed_loop.ClosedLoop`) then measure, on the generated
samples, how far an error made at each step alone moves them (the step's sensitivity),
which of Auto's planner variants drifts least at each budget, and refine that variant's
plan (`planner.refine_schedule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..closed_loop import ClosedLoop, Run
from ..models import fingerprint, output_tensor
from .engine import enabled
from .planner import BUDGETS, VARIANTS, Schedule, auto_plan, refine_schedule
from .policies.auto import Auto, AutoPolicy
from .policies.teacache import TeaCacheState, teacache_signal
from .policy import Action, BranchMemory, Policy, State, Step, StepCacheConfig, check_int, check_range
from .profile import Profile

TOKENS = 512  # tokens sampled per trajectory to measure errors on
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the error tables are computed


def calibrate(pipe: Any, prompts: Sequence, run: Run | None = None, segments: int = 4,
              auto_budgets: tuple[float, ...] = BUDGETS, refine_runs: int = 32) -> Profile:
    """Profile `pipe`'s transformer over full-compute generations of `prompts`.

    `run(pipe, prompt)` makes one generation (default: `pipe(prompt)`; a "prompt" may be a
    batch) and returns its samples (see `closed_loop.generated_samples`); every run must use
    the same number of steps and be deterministic. Unless `auto_budgets` is empty,
    closed-loop runs then measure each step's sensitivity (the samples' drift when the
    stack's residual is reused at that step alone), for each budget, which of Auto's planner
    variants drifts least from full compute, and refine that variant's plan with up to
    `refine_runs` more runs.
    """
    check_int("segments", segments, 1)
    check_int("refine_runs", refine_runs, 0)
    for budget in auto_budgets:
        check_range("each of auto_budgets", budget, 0.0, 1.0, low_open=True)
    loop = ClosedLoop(pipe, prompts, run)
    recorder = _Recorder(segments)
    with enabled(pipe, _RecorderConfig(recorder)) as engine:
        loop.exact = loop.generate()
    loop.check_deterministic()
    lengths = {len(t["residuals"]) for t in recorder.trajectories}
    if len(lengths) != 1:
        raise ValueError(f"every calibration run must take the same number of steps, got {sorted(lengths)}")
    transformer = engine.transformer
    profile = _tabulate(recorder.trajectories, engine.edges, transformer, [str(p) for p in prompts])
    stack = [0, profile.edges[-1]]

    def scheduled(edges: list[int], schedule: Schedule):
        return enabled(pipe, _ScheduleConfig(profile, edges, schedule))

    if auto_budgets:
        weights, steps = profile.step_weights(), range(1, profile.num_steps)
        reused_at = {s: [[Action.REUSE if i == s else Action.COMPUTE for i in range(profile.num_steps)]] for s in steps}
        probes = loop.sensitivities(steps, lambda s: scheduled(stack, reused_at[s]),
                                    [profile.stack_reuse_error[s][s - 1] * weights[s] for s in steps])
        profile.sensitivity = [probes[0], *probes]  # step 0 is always computed
    for budget in auto_budgets:
        best, drifts = loop.least_drift(VARIANTS, lambda v: enabled(pipe, Auto(budget, profile, variant=v)))
        profile.auto_variants[str(budget)] = list(best)
        profile.auto_drift[str(budget)] = drifts
        if refine_runs:
            edges, schedule = auto_plan(profile, budget, best)
            schedule = refine_schedule(lambda s: loop.half_drifts(scheduled(edges, s)), schedule, refine_runs)
            profile.auto_schedules[str(budget)] = {
                "edges": edges, "schedule": [[a.value for a in segment] for segment in schedule],
                "drift": loop.drift(scheduled(edges, schedule))}
    return profile


class _Recorder(Policy):
    """Computes everything and records each segment's residual on a fixed token sample."""

    def __init__(self, num_segments: int):
        self.num_segments = num_segments
        self.trajectories: list[dict] = []
        self.open: dict[str, dict] = {}
        self.index: torch.Tensor | None = None  # the sampled tokens

    def new_state(self) -> TeaCacheState:
        return TeaCacheState()

    def boundaries(self, num_blocks: int) -> list[int]:
        n = min(self.num_segments, num_blocks)
        return [round(k * num_blocks / n) for k in range(n + 1)]

    def computed(self, step: Step, segment: int, x_in: State, x_out: State, memory: BranchMemory) -> None:
        if segment == 0:
            if step.index == 0:
                self.open[step.branch] = {"residuals": [], "h0": [], "signal": [], "timesteps": [], "outputs": []}
                self.trajectories.append(self.open[step.branch])
            record = self.open[step.branch]
            record["timesteps"].append(step.timestep)
            record["signal"].append(teacache_signal(x_in, memory.temb, memory.state.previous, step.group))
            memory.state.previous = (x_in[0], memory.temb)
            record["h0"].append(self._sample(x_in[0]))
            record["residuals"].append([])
        self.open[step.branch]["residuals"][-1].append(self._sample(x_out[0] - x_in[0]))

    def call_done(self, step: Step, branches: dict[str, BranchMemory], output) -> None:
        self.open[step.branch]["outputs"].append(float(output_tensor(output).float().abs().mean()))

    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        if self.index is None:
            generator = torch.Generator().manual_seed(0)
            self.index = torch.randperm(len(tokens), generator=generator)[:TOKENS].sort().values
        return tokens[self.index.to(x.device)].float().cpu()


@dataclass(frozen=True)
class _ScheduleConfig(StepCacheConfig):
    """Fixed actions per segment and step (calibrate's sensitivity probes and schedule refinement)."""

    profile: Profile
    edges: list[int]
    schedule: Schedule

    def make_policy(self, transformer: nn.Module | None = None) -> Policy:
        return AutoPolicy(self.edges, lambda num_steps: self.schedule, default_steps=self.profile.num_steps)


@dataclass(frozen=True)
class _RecorderConfig(StepCacheConfig):
    recorder: _Recorder

    def make_policy(self, transformer: nn.Module | None = None) -> Policy:
        return self.recorder


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x.abs().mean(dim=(-2, -1))


def _errors(r: torch.Tensor, scale: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Reuse error [s, c] and first-order forecast error [s, c1, c2] of residuals r (S, N, D), in output units."""
    steps = len(r)
    r, scale = r.to(DEVICE), scale.to(DEVICE)
    reuse = (_norm(r[:, None] - r[None]) * scale[:, None]).cpu().numpy()
    forecast = np.zeros((steps, steps, steps))
    s = torch.arange(steps, device=DEVICE)
    for c1 in range(1, steps):
        slope = (r[c1] - r[:c1]) / (c1 - s[:c1]).view(-1, 1, 1).float()  # from each earlier c2
        for later in range(c1 + 1, steps):
            forecast[later, c1, :c1] = (_norm(r[later] - (r[c1] + slope * (later - c1))) * scale[later]).cpu().numpy()
    return reuse, forecast


def _tabulate(trajectories: list[dict], edges: list[int], transformer: nn.Module, prompts: list[str]) -> Profile:
    num_steps = len(trajectories[0]["residuals"])
    parts = len(edges)  # the segments, then the whole stack
    reuse = np.zeros((parts, num_steps, num_steps))
    forecast = np.zeros((parts, num_steps, num_steps, num_steps))
    gain = np.zeros((num_steps, num_steps))
    signals, changes = [], []
    for trajectory in trajectories:
        r = torch.stack([torch.stack(step) for step in trajectory["residuals"]])  # (S, K, N, D)
        stack = r.sum(1)
        top = torch.stack(trajectory["h0"]) + stack  # the last block's output
        scale = torch.tensor(trajectory["outputs"]) / _norm(top)  # error in hidden units -> error in output units
        for k, residual in enumerate([*r.unbind(1), stack]):
            errors = _errors(residual, scale)
            reuse[k] += errors[0]
            forecast[k] += errors[1]
        flat = stack.flatten(1).double()
        gain += ((flat @ flat.T) / (flat * flat).sum(1)[None, :].clamp_min(1e-12)).numpy()
        for i in range(1, num_steps):
            if trajectory["signal"][i] is not None:
                signals.append(trajectory["signal"][i])
                changes.append(float(_norm(stack[i] - stack[i - 1]) / _norm(stack[i - 1]).clamp_min(1e-12)))
    n = len(trajectories)
    coefficients = np.polyfit(signals, changes, deg=min(4, max(len(signals) - 1, 0))).tolist() if signals else [1.0, 0.0]
    return Profile(
        model=type(transformer).__name__,
        fingerprint=fingerprint(transformer),
        num_steps=num_steps,
        edges=list(edges),
        timesteps=[float(t) for t in trajectories[0]["timesteps"]],
        output_norm=np.mean([t["outputs"] for t in trajectories], 0).tolist(),
        reuse_error=(reuse[:-1] / n).tolist(),
        forecast_error=(forecast[:-1] / n).tolist(),
        stack_reuse_error=(reuse[-1] / n).tolist(),
        stack_forecast_error=(forecast[-1] / n).tolist(),
        stack_gain=(gain / n).tolist(),
        teacache_coefficients=coefficients,
        prompts=prompts,
    )
