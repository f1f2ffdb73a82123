"""`tempocache.kv`: the bounded KV cache of chunk-autoregressive video generation."""

from .attention import installed, self_attentions
from .cache import KVCache, KVLayer, Layout
from .config import FullKV, KVConfig
from .deep_sink import DeepSink
from .sinks import Sinks
from .window import SlidingWindow

__all__ = ["DeepSink", "FullKV", "KVCache", "KVConfig", "KVLayer", "Layout", "Sinks", "SlidingWindow", "installed", "self_attentions"]
