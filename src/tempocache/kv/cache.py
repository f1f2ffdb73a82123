"""The streaming KV cache: committed frames in a ring buffer, the chunk being made kept apart.

Made like transformers' `cache_utils`: a `KVCache` of one `KVLayer` per self-attention layer.
All layers share one slot table (which frame each slot holds), so evicting a frame is O(1):
its slot is simply written by the next frame. While a chunk is denoised its keys and values
are *pending*: each step's attention sees the committed frames plus the chunk's own
current keys and values, and nothing is written. `commit()` then moves the chunk into the
store, making room as the config says (`KVConfig.evict`), from either the last denoising
step's keys and values (StreamDiffusionV2) or a re-encoding pass of the clean chunk
(Self-Forcing, Ca2-VDM). The committed keys and values so serve every denoising step of
the next chunk unchanged, as Ca2-VDM shares them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import KVConfig
from .rope import FramePositions, rotate


class KVLayer:
    """One layer's keys (before rotation) and values: (B, slots x tokens per frame, heads, head_dim) each."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # the chunk's, from the last call

    def reset(self) -> None:
        self.keys = self.values = self.pending = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)

    def update(self, key: torch.Tensor, value: torch.Tensor, used_rows: int, held: tuple[torch.Tensor, torch.Tensor],
               chunk: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the chunk's (un-rotated) `key`, `value` as pending; return the keys (rotated: `held` for the
        committed rows, `chunk` for the chunk's) and values to attend to."""
        self.pending = (key, value)
        chunk_key = rotate(key, *chunk)
        if used_rows == 0:
            return chunk_key, value
        keys = torch.cat([rotate(self.keys[:, :used_rows], *held), chunk_key], 1)
        return keys, torch.cat([self.values[:, :used_rows], value], 1)

    def write(self, slots: list[int], tokens: int, capacity: int | None) -> None:
        """Store the pending chunk's frames in `slots` (one per frame), growing the buffer if unbounded."""
        key, value = self.pending
        if self.keys is None:
            rows = (capacity or len(slots)) * tokens
            self.keys = key.new_empty(key.shape[0], rows, *key.shape[2:])
            self.values = value.new_empty(value.shape[0], rows, *value.shape[2:])
        needed = (max(slots) + 1) * tokens
        if needed > self.keys.shape[1]:  # unbounded: double, so that a long stream copies O(length) in all
            grow = max(needed, 2 * self.keys.shape[1]) - self.keys.shape[1]
            self.keys = torch.cat([self.keys, self.keys.new_empty(self.keys.shape[0], grow, *self.keys.shape[2:])], 1)
            self.values = torch.cat([self.values, self.values.new_empty(self.values.shape[0], grow, *self.values.shape[2:])], 1)
        for i, slot in enumerate(slots):
            rows = slice(slot * tokens, (slot + 1) * tokens)
            self.keys[:, rows] = key[:, i * tokens:(i + 1) * tokens]
            self.values[:, rows] = value[:, i * tokens:(i + 1) * tokens]
        self.pending = None


@dataclass
class Layout:
    """What every call of one stream shares: frames per chunk and each frame's token grid."""

    chunk_frames: int
    rows: int
    cols: int

    @property
    def tokens(self) -> int:
        return self.rows * self.cols


class KVCache:
    """The cache of one stream: `layers[i]` for self-attention layer i, and the slot table they share."""

    def __init__(self, config: KVConfig, num_layers: int, rope, layout: Layout):
        config.check(layout.chunk_frames)
        self.config, self.layout = config, layout
        self.layers = [KVLayer() for _ in range(num_layers)]
        self.positions = FramePositions(rope, layout.rows, layout.cols)
        self.reset()

    def reset(self) -> None:
        """Forget every frame: the next chunk is the stream's first."""
        for layer in self.layers:
            layer.reset()
        self.slot_frames: list[int] = []  # frame held in slot s (slots fill in order and are then reused)
        self.slot_of: dict[int, int] = {}  # its inverse
        self.frames_made = 0  # frames committed so far; the pending chunk's first frame has this index
        self._rotary: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def held(self) -> list[int]:
        """The frames held, oldest first."""
        return sorted(self.slot_frames)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def rotary(self, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) for the held rows, slot order ("held"), and for the pending chunk ("chunk")."""
        if not self._rotary:
            held_positions, chunk_positions = self.config.positions(self.held, self.layout.chunk_frames)
            position_of = dict(zip(self.held, held_positions))
            self._rotary = {"held": self.positions([position_of[f] for f in self.slot_frames], device),
                            "chunk": self.positions(chunk_positions, device)}
        return self._rotary

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s keys and values to attend to for the pending chunk's (un-rotated) `key` and `value`."""
        rotary = self.rotary(key.device)
        return self.layers[layer].update(key, value, len(self.slot_frames) * self.layout.tokens, rotary["held"], rotary["chunk"])

    def commit(self) -> None:
        """Store the pending chunk (the keys and values of the last call), evicting as the config says."""
        if any(layer.pending is None for layer in self.layers):
            raise RuntimeError("commit() needs a call on the pending chunk first")
        chunk = range(self.frames_made, self.frames_made + self.layout.chunk_frames)
        evicted = self.config.evict(self.held, self.layout.chunk_frames)
        if len(evicted) > len(chunk):
            raise RuntimeError(f"{self.config} evicted more frames than a chunk fills")
        slots = [self.slot_of.pop(frame) for frame in evicted]  # the evicted frames' slots, then new ones
        new = len(chunk) - len(slots)
        slots += range(len(self.slot_frames), len(self.slot_frames) + new)
        self.slot_frames += [-1] * new
        for frame, slot in zip(chunk, slots):
            self.slot_frames[slot], self.slot_of[frame] = frame, slot
        capacity = self.config.capacity(self.layout.chunk_frames)
        for layer in self.layers:
            layer.write(slots, self.layout.tokens, capacity)
        self.frames_made += self.layout.chunk_frames
        self._rotary = {}
