"""CFG-difference reuse (FasterCache, Lv et al. 2025: the conditional/unconditional outputs
differ by a slowly changing amount).

At most steps the unconditional call is not run: its output is the conditional output of
the same step plus the difference between the two at the last step both were computed.
Needs the pipeline to name its calls `cache_context("cond")` / `cache_context("uncond")`,
the conditional one first, as diffusers' pipelines do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..adapters import output_tensor
from ..policy import BranchMemory, Policy, Step, check_int


@dataclass(frozen=True)
class CFGReuse:
    interval: int = 2  # the unconditional branch is computed every `interval` steps; 1: always
    warmup: int = 2

    def __post_init__(self):
        check_int("interval", self.interval, 1)
        check_int("warmup", self.warmup, 1)

    def make_policy(self, transformer=None) -> Policy:
        return CFGReusePolicy(self)


def _with_sample(output, sample: torch.Tensor):
    return (sample, *output[1:]) if isinstance(output, tuple) else replace(output, sample=sample)


class CFGReusePolicy(Policy):
    def __init__(self, config: CFGReuse):
        self.config = config

    def call_output(self, step: Step, branches: dict[str, BranchMemory]):
        if step.branch not in ("cond", "uncond"):
            raise ValueError(f"CFGReuse needs the CFG calls named with transformer.cache_context('cond' / 'uncond'), got a call named {step.branch!r}")
        c = self.config
        if step.branch != "uncond" or step.index < c.warmup or (step.index - c.warmup) % c.interval == 0:
            return None
        cond = branches.get("cond")
        uncond = branches[step.branch]
        if cond is None or cond.scratch.get("output_step") != step.index or "difference" not in uncond.scratch:
            return None
        output = cond.scratch["output"]
        return _with_sample(output, output_tensor(output) + uncond.scratch["difference"])

    def call_done(self, step: Step, branches: dict[str, BranchMemory], output) -> None:
        memory = branches[step.branch]
        if step.branch == "cond":
            memory.scratch["output"], memory.scratch["output_step"] = output, step.index
        elif branches.get("cond") is not None and branches["cond"].scratch.get("output_step") == step.index:
            memory.scratch["difference"] = output_tensor(output) - output_tensor(branches["cond"].scratch["output"])
