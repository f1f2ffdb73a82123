"""Profiles: what full-compute trajectories of a model say about the cost of skipping.

`calibrate` runs a pipeline at full compute on a few prompts while recording, at every
step and for every segment of the block stack, the segment's residual (on a fixed
sample of tokens). From those it tabulates, averaged over prompts and CFG branches:
- the error of reusing a segment's residual from an earlier step, and of forecasting it
  (first-order Taylor) from two earlier steps, in units of the model output;
- the stack residual's reuse error and least-squares gain (ERTACache);
- TeaCache's polynomial from its input signal to the stack's output change.
Closed-loop runs then measure how much an error made at each step still moves the
final sample (later steps partly undo early errors, or amplify them), and which of
Auto's planner variants drifts least at each budget.
Profiles are JSON, reused across runs; the shipped models have theirs in `profiles/`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .adapters import output_tensor
from .policy import Action, BranchMemory, Policy, State, Step, relative_change

SHIPPED_DIR = Path(__file__).parent / "profiles"
TOKENS = 512  # tokens sampled per trajectory to measure errors on
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the error tables are computed
OUTPUT_SAMPLES = 4096  # output values sampled per call to measure closed-loop drift on
# Auto's planner variants tried by calibrate: (forecast error penalty, plan the whole stack as one segment,
# weight steps by their measured closed-loop sensitivity). The open-loop error tables cannot see how errors
# compound; closed-loop runs pick the variant that copes best on the model at hand.
# The first is the default when a profile has no closed-loop choice.
# Budgets calibrate compares and refines Auto's plans at; Auto at any other budget plans from the nearest one's variant.
AUTO_BUDGETS = (0.7, 0.6, 0.5, 0.45, 0.4, 0.37, 0.33, 0.25, 0.2)
AUTO_VARIANTS = tuple((penalty, whole, sensitive) for penalty in (1.0, float("inf")) for whole in (True, False) for sensitive in (False, True))


@dataclass
class Profile:
    model: str  # transformer class
    num_steps: int
    edges: list[int]  # segment boundaries in blocks
    timesteps: list[float]
    output_norm: list[float]  # mean |model output| per step
    reuse_error: list  # [segment][step][earlier step]
    forecast_error: list  # [segment][step][last computed][the one before]
    stack_reuse_error: list  # [step][earlier step], the whole stack as one segment
    stack_forecast_error: list  # [step][last computed][the one before]
    stack_gain: list  # [step][earlier step]: least-squares scale of the reused stack residual
    teacache_coefficients: list[float]
    prompts: list[str]
    # [step]: final-sample drift per unit of output error made at that step alone, measured closed-loop
    sensitivity: list[float] = field(default_factory=list)
    # Auto's planner variant per budget, chosen by closed-loop runs (see AUTO_VARIANTS)
    auto_variants: dict[str, list] = field(default_factory=dict)
    auto_drift: dict[str, list] = field(default_factory=dict)  # budget -> closed-loop drift of each variant
    # budget -> {"edges", "schedule": [segment][step] action values, "drift"}: the best variant's plan, refined closed-loop
    auto_schedules: dict[str, dict] = field(default_factory=dict)

    def auto_variant(self, budget: float) -> tuple[float, bool, bool]:
        if not self.auto_variants:
            return AUTO_VARIANTS[0]
        penalty, whole_stack, sensitive = self.auto_variants[min(self.auto_variants, key=lambda b: abs(float(b) - budget))]
        return float(penalty), bool(whole_stack), bool(sensitive)

    def auto_schedule(self, budget: float) -> tuple[list[int], list[list[Action]]] | None:
        """The refined schedule calibrate stored for exactly this budget, if any."""
        for key, stored in self.auto_schedules.items():
            if abs(float(key) - budget) < 1e-9:
                return list(stored["edges"]), [[Action(a) for a in segment] for segment in stored["schedule"]]
        return None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        return cls(**json.loads(Path(path).read_text()))

    def check_steps(self, num_steps: int, policy: str) -> None:
        if num_steps != self.num_steps:
            raise ValueError(f"{policy}'s profile was made for {self.num_steps} steps, this generation has {num_steps}: "
                             f"run `tempocache calibrate` with {num_steps} steps and pass the profile")

    def step_weights(self, sensitive: bool = False) -> np.ndarray:
        """How much an error in the model output at each step moves the sample: the sampler's step size,
        times the measured closed-loop sensitivity if `sensitive` (and it was measured)."""
        t = np.array(self.timesteps + [0.0])
        weights = np.abs(np.diff(t)) / max(abs(t[0]), 1e-12)
        return weights * np.array(self.sensitivity) if sensitive and self.sensitivity else weights


def teacache_signal(x: State, temb: torch.Tensor | None, previous: tuple | None) -> float | None:
    """TeaCache's input signal: the relative change of the first block's input and of its timestep embedding."""
    if previous is None:
        return None
    signal = relative_change(x[0], previous[0])
    if temb is not None and previous[1] is not None:
        signal += relative_change(temb, previous[1])
    return signal


def shipped_profile_path(transformer: torch.nn.Module) -> Path | None:
    from ..reference.models import reference_name_of

    name = reference_name_of(transformer)
    return SHIPPED_DIR / f"{name}.json" if name else None


def load_profile(profile: "str | Path | Profile | None", transformer: torch.nn.Module | None) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile is None:
        path = shipped_profile_path(transformer) if transformer is not None else None
        if path is None or not path.exists():
            name = type(transformer).__name__ if transformer is not None else "this model"
            raise ValueError(f"no profile for {name}: run `tempocache calibrate` (or tempocache.calibrate(pipe, prompts)) "
                             "and pass profile=<the JSON it writes>")
        profile = path
    return Profile.load(profile)


class _Recorder(Policy):
    """Computes everything and records each segment's residual on a fixed token sample."""

    def __init__(self, num_segments: int):
        self.num_segments = num_segments
        self.trajectories: list[dict] = []
        self.open: dict[str, dict] = {}
        self.calls: list[tuple[int, int]] = []  # (trajectory, step) of every transformer call, in order
        self.output_samples: list[torch.Tensor] = []

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
            record["signal"].append(teacache_signal(x_in, memory.temb, memory.scratch.get("previous")))
            memory.scratch["previous"] = (x_in[0], memory.temb)
            record["h0"].append(self._sample(x_in[0]))
            record["residuals"].append([])
        self.open[step.branch]["residuals"][-1].append(self._sample(x_out[0] - x_in[0]))

    def call_done(self, step: Step, branches: dict[str, BranchMemory], output) -> None:
        self.open[step.branch]["outputs"].append(float(output_tensor(output).float().abs().mean()))
        self.calls.append((id(self.open[step.branch]), step.index))
        self.output_samples.append(output_sample(output))

    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        if not hasattr(self, "index"):
            generator = torch.Generator().manual_seed(0)
            self.index = torch.randperm(len(tokens), generator=generator)[:TOKENS].sort().values
        return tokens[self.index.to(x.device)].float().cpu()


def output_sample(output) -> torch.Tensor:
    """OUTPUT_SAMPLES evenly spaced values of a transformer call's output, on the CPU."""
    sample = output_tensor(output).flatten()
    index = torch.linspace(0, len(sample) - 1, min(OUTPUT_SAMPLES, len(sample)), device=sample.device).long()
    return sample[index].float().cpu()


def calibrate(pipe: Any, prompts: list, run: Callable[[Any, Any], Any] | None = None, segments: int = 4,
              auto_budgets: tuple[float, ...] = AUTO_BUDGETS, refine_runs: int = 32) -> Profile:
    """Profile `pipe`'s transformer over full-compute generations of `prompts`.

    `run(pipe, prompt)` makes one generation (default: `pipe(prompt)`; a "prompt" may be a
    batch); every run must use the same number of steps. Unless `auto_budgets` is empty,
    closed-loop runs then measure each step's sensitivity (the sample's drift when the
    stack's residual is reused at that step alone), for each budget, which of Auto's
    planner variants drifts least from full compute, and then refine that variant's plan
    closed-loop with up to `refine_runs` more runs (see `refine_schedule`).
    """
    from .engine import disable, enable
    from .policies.auto import Auto, auto_plan

    if not prompts:
        raise ValueError("calibrate needs at least one prompt")
    run = run or (lambda p, prompt: p(prompt))

    def run_all(config) -> Any:
        engine = enable(pipe, config)
        try:
            for prompt in prompts:
                run(pipe, prompt)
        finally:
            disable(pipe)
        return engine

    recorder = _Recorder(segments)
    engine = run_all(_RecorderConfig(recorder))
    lengths = {len(t["residuals"]) for t in recorder.trajectories}
    if len(lengths) != 1:
        raise ValueError(f"every calibration run must take the same number of steps, got {sorted(lengths)}")
    profile = _tabulate(recorder.trajectories, engine.edges, type(engine.transformer).__name__, [str(p) for p in prompts])
    weights = profile.step_weights()

    def drift(config) -> float:
        """Summed over trajectories: the RMS of how far the final sample moved from full compute (weighted output errors)."""
        captured = []
        handle = engine.transformer.register_forward_hook(lambda module, args, output: captured.append(output_sample(output)))
        try:
            run_all(config)
        finally:
            handle.remove()
        totals: dict[int, torch.Tensor] = {}
        for (trajectory, step), approx, exact in zip(recorder.calls, captured, recorder.output_samples):
            totals[trajectory] = totals.get(trajectory, 0) + weights[step] * (approx - exact)
        return float(sum(t.pow(2).mean().sqrt() for t in totals.values()))

    if auto_budgets:
        probes = []
        for step in range(1, profile.num_steps):
            schedule = [Action.REUSE if s == step else Action.COMPUTE for s in range(profile.num_steps)]
            predicted = profile.stack_reuse_error[step][step - 1] * weights[step]
            probes.append(drift(_ScheduleConfig(profile, [0, profile.edges[-1]], [schedule])) / max(predicted, 1e-12))
        profile.sensitivity = [probes[0], *probes]  # step 0 is always computed
    for budget in auto_budgets:
        drifts = {variant: drift(Auto(budget, profile, variant=variant)) for variant in AUTO_VARIANTS}
        best = min(drifts, key=drifts.get)
        profile.auto_variants[str(budget)] = list(best)
        profile.auto_drift[str(budget)] = list(drifts.values())
        if refine_runs:
            edges, schedule = auto_plan(profile, budget, best)
            schedule, error = refine_schedule(lambda s: drift(_ScheduleConfig(profile, edges, s)), schedule, drifts[best], refine_runs)
            profile.auto_schedules[str(budget)] = {
                "edges": edges, "schedule": [[a.value for a in segment] for segment in schedule], "drift": error}
    return profile


def refine_schedule(drift: Callable[[list[list[Action]]], float], schedule: list[list[Action]], error: float,
                    runs: int) -> tuple[list[list[Action]], float]:
    """Greedy closed-loop search among schedules of the same compute, within `runs` evaluations.

    The planner's error tables are open-loop; the closed loop can prefer other steps (an
    early reuse that looks cheap may steer the whole trajectory off). Each sweep tries, on
    the current schedule, moving one computed step of a segment a step earlier or later
    and switching a run of skipped steps between reuse and forecast, keeping every change
    that lowers `drift`. Step 0 is always computed.
    """
    improved = True
    while improved and runs > 0:
        improved = False
        moves = [(k, s, d) for k, segment in enumerate(schedule) for s, a in enumerate(segment) if s > 0
                 for d in ((-1, 1) if a is Action.COMPUTE else (0,))]
        for k, s, d in moves:
            if runs == 0:
                break
            candidate = _moved(schedule, k, s, d)
            if candidate is None:
                continue
            runs -= 1
            candidate_error = drift(candidate)
            if candidate_error < error:
                schedule, error, improved = candidate, candidate_error, True
    return schedule, error


def _moved(schedule: list[list[Action]], k: int, s: int, d: int) -> list[list[Action]] | None:
    """Segment k's computed step s moved by d; or (d = 0) the run of skipped steps at s switched reuse <-> forecast
    (only from its first step, so each run is one move). None if the move does not apply."""
    segment = list(schedule[k])
    if d:
        target = s + d
        if segment[s] is not Action.COMPUTE or not 0 < target < len(segment) or segment[target] is Action.COMPUTE:
            return None
        segment[s], segment[target] = segment[target], Action.COMPUTE
    else:
        if segment[s] is Action.COMPUTE or segment[s - 1] is not Action.COMPUTE:
            return None
        flipped = Action.REUSE if segment[s] is Action.FORECAST else Action.FORECAST
        while s < len(segment) and segment[s] is not Action.COMPUTE:
            segment[s] = flipped
            s += 1
    return [segment if i == k else schedule[i] for i in range(len(schedule))]


@dataclass(frozen=True)
class _ScheduleConfig:
    """Fixed actions per segment and step (calibrate's sensitivity probes and schedule refinement)."""

    profile: Profile
    edges: list[int]
    schedule: list[list[Action]]

    def make_policy(self, transformer=None) -> Policy:
        from .policies.auto import Auto, AutoPolicy

        return AutoPolicy(Auto(1.0, self.profile), self.profile, self.edges, self.schedule)


@dataclass(frozen=True)
class _RecorderConfig:
    recorder: _Recorder

    def make_policy(self, transformer=None) -> Policy:
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


def _tabulate(trajectories: list[dict], edges: list[int], model: str, prompts: list[str]) -> Profile:
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
        model=model,
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
