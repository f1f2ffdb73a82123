"""Timestep-aware W8A8 quantization: `tempocache.quantize(pipe_or_transformer, config)`."""

from .adaptive import QuantProfile, TimestepAdaptive, calibrate_quant
from .quantize import W8A8, quant_stats, quantize

__all__ = ["QuantProfile", "TimestepAdaptive", "W8A8", "calibrate_quant", "quant_stats", "quantize"]
