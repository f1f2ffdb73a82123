"""Closed-loop measurement, shared by the calibrations: run the same generations under a setting and measure
how far their samples move from the exact ones.

Open-loop error tables cannot see how errors compound along a trajectory (later steps
partly undo an early error, or amplify it), so both calibrations choose among their
settings by what the generated samples themselves do: per step, how far an error made
there alone moves them (a step's sensitivity), and per budget, which setting moves them
least. Drift is the geometric mean over samples of each sample's RMS error: it ranks
settings as the mean PSNR over samples does, where an RMS over the whole batch would be
ruled by its worst samples. Each sample is compared with the same prompt's exact sample,
so guided branches are scored as guidance combines them, not one by one.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Sequence, TypeVar

import numpy as np
import torch

T = TypeVar("T")
Run = Callable[[Any, Any], Any]  # (pipe, prompt) -> one generation's samples


def generated_samples(result: Any) -> torch.Tensor:
    """A run's generated samples, one per row: a tensor or array, or a pipeline output's `frames` or `images` as one."""
    samples = getattr(result, "frames", getattr(result, "images", result))
    if not isinstance(samples, (torch.Tensor, np.ndarray)):
        raise TypeError(f"a calibration run must return the generated samples, a tensor or array (for a diffusers "
                        f"pipeline: output_type='pt' or 'np'), or an output whose frames or images is one; "
                        f"got {type(samples).__name__}")
    return torch.as_tensor(samples).detach().float().cpu().flatten(1)


def drift(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """How far samples (rows) moved: the geometric mean over samples of each one's RMS error."""
    return float((approx - exact).pow(2).mean(dim=1).sqrt().clamp(min=1e-12).log().mean().exp())


class ClosedLoop:
    """Generations of fixed prompts (`run(pipe, prompt)`, a prompt may be a batch), measured against exact ones."""

    def __init__(self, pipe: Any, prompts: Sequence, run: Run | None = None):
        if isinstance(prompts, (str, bytes)):
            raise TypeError(f"prompts must be a list of prompts (or of batches), got the string {prompts!r}: "
                            f"pass [{prompts!r}]")
        if not prompts:
            raise ValueError("calibration needs at least one prompt")
        self.pipe, self.prompts = pipe, list(prompts)
        self.run = run or (lambda p, prompt: p(prompt))
        self.exact: torch.Tensor | None = None

    def generate(self, setting: ContextManager | None = None) -> torch.Tensor:
        """The samples of every prompt, one per row, generated inside `setting`."""
        with setting or contextlib.nullcontext():
            return torch.cat([generated_samples(self.run(self.pipe, prompt)) for prompt in self.prompts])

    def check_deterministic(self, setting: ContextManager | None = None) -> None:
        """Refuse runs that do not repeat: a calibration of them would fit their noise. Runs the first prompt again,
        inside the `setting` the exact samples were made in."""
        with setting or contextlib.nullcontext():
            again = generated_samples(self.run(self.pipe, self.prompts[0]))
        if not torch.equal(again, self.exact[:len(again)]):
            raise ValueError("two runs of the same prompt gave different samples: calibration needs deterministic runs "
                             "(for a diffusers pipeline, pass generator=torch.Generator().manual_seed(0) in run)")

    def drift(self, setting: ContextManager) -> float:
        return drift(self.generate(setting), self.exact)

    def half_drifts(self, setting: ContextManager) -> tuple[float, float]:
        """The drift of the even and of the odd samples (of all, if there is one): a search that keeps only what
        lowers both does not fit its choices to a few prompts."""
        samples = self.generate(setting)
        if len(samples) < 2:
            return (drift(samples, self.exact),) * 2
        return drift(samples[0::2], self.exact[0::2]), drift(samples[1::2], self.exact[1::2])

    def sensitivities(self, steps: Sequence[T], perturbed_at: Callable[[T], ContextManager],
                      predicted: Sequence[float]) -> list[float]:
        """Per step: the drift when `perturbed_at(step)` perturbs that step alone, per unit of the error `predicted`
        for that perturbation."""
        return [self.drift(perturbed_at(step)) / max(p, 1e-12) for step, p in zip(steps, predicted)]

    def least_drift(self, candidates: Sequence[T], setting: Callable[[T], ContextManager]) -> tuple[T, list[float]]:
        """The candidate whose setting drifts least, and every candidate's drift (first one on ties)."""
        drifts = [self.drift(setting(c)) for c in candidates]
        return candidates[int(np.argmin(drifts))], drifts
