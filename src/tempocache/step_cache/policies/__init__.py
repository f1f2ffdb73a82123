"""Step-cache policies, one per file, each citing its paper."""

from .auto import Auto
from .cfg_reuse import CFGReuse
from .delta_dit import DeltaDiT
from .ertacache import ERTACache
from .first_block import DBCache, FirstBlockCache
from .static import StaticCache
from .taylorseer import GatedTaylorSeer, TaylorSeer
from .teacache import TeaCache
from .temporal_delta import TemporalDeltaCache

__all__ = ["Auto", "CFGReuse", "DBCache", "DeltaDiT", "ERTACache", "FirstBlockCache", "GatedTaylorSeer",
           "StaticCache", "TaylorSeer", "TeaCache", "TemporalDeltaCache"]
