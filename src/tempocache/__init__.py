"""tempocache: make diffusion transformers fast by exploiting temporal redundancy."""

from .generate import generate, load_pipeline, save_clips
from .reference.models import SPECS
from .reference.pipeline import ShapesPipeline, ShapesOutput
from .quant import *  # noqa: F403
from .quant import __all__ as _quant
from .step_cache import *  # noqa: F403
from .step_cache import __all__ as _step_cache

SHIPPED_MODELS = tuple(SPECS)

__all__ = ["SHIPPED_MODELS", "ShapesOutput", "ShapesPipeline", "generate", "load_pipeline", "save_clips", *_quant, *_step_cache]
