"""Timestep-aware W8A8 quantization: `tempocache.quantize(pipe_or_transformer, config, filter_fn)`."""

from .adaptive import QuantProfile, TimestepAdaptive, calibrate_quant
from .quantize import W8A8, QuantConfig, quant_stats, quantize

__all__ = ["QuantConfig", "QuantProfile", "TimestepAdaptive", "W8A8", "calibrate_quant", "quant_stats", "quantize"]
