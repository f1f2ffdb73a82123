"""`tempocache.kv`: the bounded KV cache of chunk-autoregressive video generation."""

from .attention import installed, self_attentions
from .auto import Auto
from .cache import KVCache, KVLayer, Layout
from .config import FullKV, KVConfig
from .deep_sink import DeepSink
from .heavy_hitters import HeavyHitters
from .participative import Participative
from .quantized import KVQuant, blockwise_attention
from .recompute import Recompute
from .sinks import Sinks
from .soft_prune import SoftPrune
from .temporal_merge import TempCache
from .window import SlidingWindow

__all__ = ["Auto", "DeepSink", "FullKV", "HeavyHitters", "KVCache", "KVConfig", "KVLayer", "KVQuant", "Layout", "Participative", "Recompute",
           "Sinks", "SlidingWindow", "SoftPrune", "TempCache", "blockwise_attention", "installed", "self_attentions"]
