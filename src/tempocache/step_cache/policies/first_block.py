"""First-block cache and its dual-block generalisation DBCache (ParaAttention's FBCache; cache-dit's DBCache).

Always compute the first `fn` blocks. If their residual has changed by less than
`threshold` (relative L1) since the middle blocks were last computed, reuse the middle
blocks' cached residual; always compute the last `bn` blocks, which correct the
approximation.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..policy import Action, BranchMemory, Policy, State, Step, check_int, check_range, relative_change


@dataclass(frozen=True)
class DBCache:
    fn: int = 1  # front blocks always computed
    bn: int = 0  # back blocks always computed
    threshold: float = 0.08  # 0 computes every step
    warmup: int = 1
    max_cached_steps: int | None = None  # cap on consecutive cached steps

    def __post_init__(self):
        check_int("fn", self.fn, 1)
        check_int("bn", self.bn, 0)
        check_range("threshold", self.threshold, 0.0, 10.0)
        check_int("warmup", self.warmup, 1)
        if self.max_cached_steps is not None:
            check_int("max_cached_steps", self.max_cached_steps, 1)

    def make_policy(self, transformer=None) -> Policy:
        return DBCachePolicy(self)


def FirstBlockCache(threshold: float = 0.08, warmup: int = 1, max_cached_steps: int | None = None) -> DBCache:
    """DBCache with only the first block as the probe (F1B0)."""
    return DBCache(1, 0, threshold, warmup, max_cached_steps)


class DBCachePolicy(Policy):
    def __init__(self, config: DBCache):
        self.config = config

    def check(self, num_blocks: int) -> None:
        if self.config.fn + self.config.bn >= num_blocks:
            raise ValueError(f"fn + bn = {self.config.fn + self.config.bn} leaves no block to cache "
                             f"in a stack of {num_blocks}; it must be below {num_blocks}")

    def boundaries(self, num_blocks: int) -> list[int]:
        edges = [0, self.config.fn, num_blocks - self.config.bn, num_blocks]
        return sorted(set(edges))

    def decide(self, step: Step, segment: int, x: State, memory: BranchMemory) -> Action:
        if segment != 1:
            return Action.COMPUTE
        c = self.config
        probe = memory.segments[0].history[-1][1][0]
        reference = memory.scratch.get("probe")
        cached = memory.scratch.get("cached_steps", 0)
        if (step.index < c.warmup or reference is None or (c.max_cached_steps is not None and cached >= c.max_cached_steps)
                or relative_change(probe, reference) >= c.threshold):
            return Action.COMPUTE
        memory.scratch["cached_steps"] = cached + 1
        return Action.REUSE

    def computed(self, step: Step, segment: int, x_in: State, x_out: State, memory: BranchMemory) -> None:
        if segment == 1:
            memory.scratch["probe"] = memory.segments[0].history[-1][1][0]
            memory.scratch["cached_steps"] = 0
