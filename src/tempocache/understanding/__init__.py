"""Streaming video understanding (`tempocache.watch`): questions about a stream of any length, with the memory a `tempocache.kv` policy bounds."""

from .auto import Auto
from .condensed import Condensed
from .rekv import ReKV
from .watcher import Answer, Watcher, watch

__all__ = ["Answer", "Auto", "Condensed", "ReKV", "Watcher", "watch"]
