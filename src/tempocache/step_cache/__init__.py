"""Step caching: skip, reuse or forecast transformer-block work across denoising steps."""

from .engine import disable, enable, reset, stats
from .policies import *  # noqa: F403
from .policies import __all__ as _policies
from .profile import Profile, calibrate

__all__ = ["Profile", "calibrate", "disable", "enable", "reset", "stats", *_policies]
