"""tempocache: make diffusion transformers fast by exploiting temporal redundancy.

The public names are imported on first use (PEP 562), so that `import tempocache` (and the CLI's
start, which quiets libraries its command does not use) costs nothing until one is needed; the
first one used also registers the shipped models' profiles.
"""

import importlib

_STEP_CACHE = ("Auto", "CFGReuse", "DBCache", "DeltaDiT", "ERTACache", "FirstBlockCache", "GatedTaylorSeer", "Profile",
               "StaticCache", "Stats", "StepCacheConfig", "TaylorSeer", "TeaCache", "TemporalDeltaCache", "calibrate",
               "check_config", "disable", "enable", "enabled", "reset", "stats")
_QUANT = ("QuantConfig", "QuantProfile", "TimestepAdaptive", "W8A8", "calibrate_quant", "quant_stats", "quantize")
_HOME = {
    **dict.fromkeys(("generate", "load_pipeline", "save_clips"), "generation"),
    "edit": "editing",
    **dict.fromkeys(("register_family", "register_profile"), "models"),
    **dict.fromkeys(("ShapesOutput", "ShapesPipeline"), "reference.pipeline"),
    "RegionE": "region",
    **dict.fromkeys(("Stream", "stream"), "streaming"),
    **dict.fromkeys(("ReKV", "Watcher", "watch"), "understanding"),
    **dict.fromkeys(_QUANT, "quant"),
    **dict.fromkeys(_STEP_CACHE, "step_cache"),
}
_SUBPACKAGES = ("bench", "cli", "closed_loop", "editing", "eval", "generation", "kv", "models", "quant", "reference", "region", "step_cache",
                "streaming", "understanding")

__all__ = ["SHIPPED_MODELS", *_HOME]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name != "SHIPPED_MODELS" and name not in _HOME:
        raise AttributeError(f"module 'tempocache' has no attribute {name!r}")
    importlib.import_module(".reference", __name__)  # registers the shipped models' profiles
    value = (tuple(importlib.import_module(".reference.models", __name__).SPECS) if name == "SHIPPED_MODELS"
             else getattr(importlib.import_module(f".{_HOME[name]}", __name__), name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
