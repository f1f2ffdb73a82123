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
from .quantized import QuantizedFrame, blockwise_attention, quantize_frame
from .rope import FramePositions, rotate


class KVLayer:
    """One layer's committed keys (before rotation) and values: exact ones in slots, (B, slots x tokens per frame,
    heads, head_dim) each, and with quantization, older frames' in `quantized` by frame."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.quantized: dict[int, QuantizedFrame] = {}
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # the chunk's, from the last call

    def reset(self) -> None:
        self.keys = self.values = self.pending = None
        self.quantized = {}

    def nbytes(self) -> int:
        exact = sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)
        return exact + sum(q.nbytes() for q in self.quantized.values())

    def exact(self, slots: list[int], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of `slots`, in that order."""
        if slots == list(range(len(slots))):  # the usual case: no copy
            return self.keys[:, :len(slots) * tokens], self.values[:, :len(slots) * tokens]
        picked = []
        for t in (self.keys, self.values):
            frames = t.unflatten(1, (-1, tokens))  # (B, slots, tokens, heads, head_dim)
            picked.append(frames[:, slots].flatten(1, 2))
        return picked[0], picked[1]

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
            self.keys, self.values = (torch.cat([t, t.new_empty(t.shape[0], grow, *t.shape[2:])], 1)
                                      for t in (self.keys, self.values))
        for i, slot in enumerate(slots):
            rows = slice(slot * tokens, (slot + 1) * tokens)
            self.keys[:, rows] = key[:, i * tokens:(i + 1) * tokens]
            self.values[:, rows] = value[:, i * tokens:(i + 1) * tokens]
        self.pending = None

    def quantize(self, frame: int, slot: int, tokens: int, bits: int) -> None:
        """Move the frame in `slot` to quantized storage (its slot is then free)."""
        rows = slice(slot * tokens, (slot + 1) * tokens)
        self.quantized[frame] = quantize_frame(self.keys[:, rows], self.values[:, rows], bits)


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
        if config.quant is not None:
            config.quant.check(rope.t_dim + rope.h_dim + rope.w_dim)
        self.config, self.layout = config, layout
        self.layers = [KVLayer() for _ in range(num_layers)]
        self.positions = FramePositions(rope, layout.rows, layout.cols)
        self.reset()

    def reset(self) -> None:
        """Forget every frame: the next chunk is the stream's first."""
        for layer in self.layers:
            layer.reset()
        self.slot_frames: list[int] = []  # the exact frame in slot s, -1 for a free slot
        self.slot_of: dict[int, int] = {}  # its inverse
        self.quantized: list[int] = []  # frames in quantized storage, oldest first
        self.frames_made = 0  # frames committed so far; the pending chunk's first frame has this index
        self.attention: dict[int, float] = {}  # for a config that scores attention: the mass each held frame received
        self._rotary: dict = {}

    @property
    def held(self) -> list[int]:
        """The frames held, oldest first."""
        return sorted([*self.slot_of, *self.quantized])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def _exact_slots(self) -> list[int]:
        return [s for s, f in enumerate(self.slot_frames) if f >= 0]

    def rotary(self, device: torch.device) -> dict:
        """(cos, sin) for the exact slots in slot order ("exact"), for each group of quantized frames ("groups",
        with the frames), and for the pending chunk ("chunk"); all by the config's positions."""
        if not self._rotary:
            held_positions, chunk_positions = self.config.positions(self.held, self.layout.chunk_frames)
            position_of = dict(zip(self.held, held_positions))
            size = self.config.quant.group_frames if self.config.quant else 1
            groups = [self.quantized[i:i + size] for i in range(0, len(self.quantized), size)]
            self._rotary = {
                "exact": self.positions([position_of[self.slot_frames[s]] for s in self._exact_slots()], device),
                "groups": [(g, *self.positions([position_of[f] for f in g], device)) for g in groups],
                "chunk": self.positions(chunk_positions, device),
            }
        return self._rotary

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention) -> torch.Tensor:
        """The pending chunk's attention output at layer `layer`, from its un-rotated query, key and value
        (B, tokens, heads, head_dim); `attention(q, k, v)` is the model's attention over whole tensors. The chunk's
        key and value are kept as pending (`commit` stores those of the last call)."""
        rotary, store, tokens = self.rotary(query.device), self.layers[layer], self.layout.tokens
        store.pending = (key, value)
        query, keys, values = rotate(query, *rotary["chunk"]), rotate(key, *rotary["chunk"]), value
        slots = self._exact_slots()
        if slots:
            held_keys, held_values = store.exact(slots, tokens)
            keys = torch.cat([rotate(held_keys, *rotary["exact"]), keys], 1)
            values = torch.cat([held_values, values], 1)
        if self.config.scores_attention and slots:
            self._score(query, keys[:, :len(slots) * tokens], slots)
        if not self.quantized:
            return attention(query, keys, values)

        def blocks():
            for frames, cos, sin in rotary["groups"]:  # one group rebuilt in full precision at a time
                stored = [store.quantized[f] for f in frames]
                group_keys = torch.cat([q.keys(key.dtype) for q in stored], 1)
                yield rotate(group_keys, cos, sin), torch.cat([q.values(value.dtype) for q in stored], 1)
            yield keys, values

        return blockwise_attention(query, blocks())

    def _score(self, query: torch.Tensor, held_keys: torch.Tensor, slots: list[int]) -> None:
        """Add to each held frame the attention mass that a sample of the chunk's queries gives its tokens (the
        softmax taken over the held keys), averaged over the layers."""
        sample = query[:, ::max(1, query.shape[1] // self.config.query_sample)].transpose(1, 2).float()
        scores = sample @ held_keys.transpose(1, 2).float().transpose(-1, -2) * query.shape[-1] ** -0.5
        mass = scores.softmax(-1).mean((0, 1, 2)).unflatten(0, (len(slots), -1)).sum(-1) / len(self.layers)
        for slot, m in zip(slots, mass.tolist()):
            frame = self.slot_frames[slot]
            self.attention[frame] = self.attention.get(frame, 0.0) + m

    def commit(self) -> None:
        """Store the pending chunk (the keys and values of the last call), evicting as the config says, and with
        quantization moving the exact frames older than the newest `recent_frames` to quantized storage."""
        if any(layer.pending is None for layer in self.layers):
            raise RuntimeError("commit() needs a call on the pending chunk first")
        chunk = range(self.frames_made, self.frames_made + self.layout.chunk_frames)
        for frame in self.config.evict(self.held, self.layout.chunk_frames, self.attention):
            self.attention.pop(frame, None)
            if frame in self.slot_of:
                self.slot_frames[self.slot_of.pop(frame)] = -1
            else:
                self.quantized.remove(frame)
                for layer in self.layers:
                    del layer.quantized[frame]
        free = [s for s, f in enumerate(self.slot_frames) if f < 0][:len(chunk)]
        new = len(chunk) - len(free)
        slots = free + list(range(len(self.slot_frames), len(self.slot_frames) + new))
        self.slot_frames += [-1] * new
        for frame, slot in zip(chunk, slots):
            self.slot_frames[slot], self.slot_of[frame] = frame, slot
        quant = self.config.quant
        capacity = (quant.recent_frames + len(chunk)) if quant else self.config.capacity(self.layout.chunk_frames)
        for layer in self.layers:
            layer.write(slots, self.layout.tokens, capacity)
        if quant is not None:
            exact = sorted(self.slot_of)
            for frame in exact[:max(0, len(exact) - quant.recent_frames)]:
                slot = self.slot_of.pop(frame)
                for layer in self.layers:
                    layer.quantize(frame, slot, self.layout.tokens, quant.bits)
                self.slot_frames[slot] = -1
                self.quantized.append(frame)
        if self.config.scores_attention:
            self.attention = {f: m * self.config.decay for f, m in self.attention.items()}
        self.frames_made += self.layout.chunk_frames
        self._rotary = {}
