"""Region-aware editing: RegionE, an editor that recomputes only the tokens an edit changes."""

from .config import RegionE
from .engine import RegionEngine, disable_region, enable_region
from .gamma import fit_gamma
from .partition import edited_tokens

__all__ = ["RegionE", "RegionEngine", "disable_region", "edited_tokens", "enable_region", "fit_gamma"]
