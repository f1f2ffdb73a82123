"""`tempocache bench`: our step-cache policies against the peers' and fewer steps, side by side."""

from .methods import groups
from .report import verdict, write_report
from .runner import read_prompts, run_bench

__all__ = ["groups", "read_prompts", "run_bench", "verdict", "write_report"]
