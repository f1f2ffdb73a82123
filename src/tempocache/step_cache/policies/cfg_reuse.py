"""CFG-difference reuse (FasterCache, Lv et al. 2025: the conditional/unconditional outputs
differ by a slowly changing amount).

At most steps the unconditional call is not run: its output is the conditional output of
the same step plus the difference between the two at the last step both were computed.
Needs the pipeline to name its calls `cache_context("cond")` / `cache_context("uncond")`,
the conditional one first, as diffusers' pipelines do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...models import output_tensor, with_output_tensor
from ..policy import BranchMemory, Policy, Step, StepCacheConfig, check_int


@dataclass(frozen=True)
class CFGReuse(StepCacheConfig):
    interval: int = 2  # the unconditional branch is computed every `interval` steps; 1: always
    warmup: int = 2

    def __post_init__(self):
        check_int("interval", self.interval, 1)
        check_int("warmup", self.warmup, 1)

    def make_policy(self, transformer: nn.Module | None = None) -> Policy:
        return CFGReusePolicy(self)


@dataclass
class BranchOutputs:
    output: Any = None  # cond: its last call's output
    output_step: int | None = None  # cond: the step of that output
    difference: torch.Tensor | None = None  # uncond: its output minus cond's, at the last step both ran


class CFGReusePolicy(Policy):
    def __init__(self, config: CFGReuse):
        self.config = config

    def new_state(self) -> BranchOutputs:
        return BranchOutputs()

    def call_output(self, step: Step, branches: dict[str, BranchMemory]):
        if step.branch not in ("cond", "uncond"):
            raise ValueError(f"CFGReuse needs the CFG calls named with transformer.cache_context('cond' / 'uncond'), "
                             f"got a call named {step.branch!r}")
        c = self.config
        if step.branch != "uncond" or step.index < c.warmup or (step.index - c.warmup) % c.interval == 0:
            return None
        cond = branches.get("cond")
        uncond: BranchOutputs = branches[step.branch].state
        if cond is None or cond.state.output_step != step.index or uncond.difference is None:
            return None
        output = cond.state.output
        return with_output_tensor(output, output_tensor(output) + uncond.difference)

    def call_done(self, step: Step, branches: dict[str, BranchMemory], output) -> None:
        state: BranchOutputs = branches[step.branch].state
        cond = branches.get("cond")
        if step.branch == "cond":
            state.output, state.output_step = output, step.index
        elif cond is not None and cond.state.output_step == step.index:
            state.difference = output_tensor(output) - output_tensor(cond.state.output)
