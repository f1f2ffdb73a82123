"""ShapesWorld, the shipped reference models and their profiles (registered on import, so that Auto,
TeaCache, ERTACache and TimestepAdaptive find them for these models)."""

from pathlib import Path

from ..models import register_profile

PROFILES_DIR = Path(__file__).parent / "profiles"


def _register_shipped_profiles() -> None:
    for kind in ("step_cache", "quant"):
        for path in sorted((PROFILES_DIR / kind).glob("*.json")):
            register_profile(kind, path)


_register_shipped_profiles()
