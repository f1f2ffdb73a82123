"""Step caching: skip, reuse or forecast transformer-block work across denoising steps."""

from .calibrate import calibrate
from .engine import Stats, check_config, disable, enable, enabled, reset, stats
from .policies import *  # noqa: F403
from .policies import __all__ as _policies
from .policy import StepCacheConfig
from .profile import Profile

__all__ = ["Profile", "Stats", "StepCacheConfig", "calibrate", "check_config", "disable", "enable", "enabled", "reset", "stats", *_policies]
