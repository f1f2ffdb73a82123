"""The streaming KV cache: committed frames in a ring buffer, the chunk being made kept apart.

Made like transformers' `cache_utils`: a `KVCache` of one `KVLayer` per self-attention layer.
All layers share one slot table (which frame each slot holds), so evicting a frame is O(1):
its slot is simply written by the next frame. While a chunk is denoised its keys and values
are *pending*: each step's attention sees the committed frames plus the chunk's own
current keys and values, and nothing is written. `commit()` then moves the chunk into the
store, from either the last denoising step's keys and values (StreamDiffusionV2) or a
re-encoding pass of the clean chunk (Self-Forcing, Ca2-VDM), after making room as the config
says: frames evicted (`KVConfig.evict`), or, layer by layer, stored in fewer bits, merged into
fewer tokens, or dropped (`KVConfig.precision`). The committed keys and values so serve every
denoising step of the next chunk unchanged, as Ca2-VDM shares them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from .config import KVConfig
from .merged import (KeepTokens, MergedFrame, Summary, TemporalMerge, fold, merged_bytes, some_tokens, summary,
                     whole_frame)
from .quantized import (REBUILD_ONCE, QuantizedFrame, blockwise_attention, exact_bytes, quantize_frame,
                        quantized_bytes)
from .rope import FramePositions, rotate


class KVLayer:
    """One layer's committed keys (before rotation) and values: exact ones in slots, (B, slots x tokens per frame,
    heads, head_dim) each, and older frames' held otherwise (quantized or merged) in `compact`, by frame."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.compact: dict[int, QuantizedFrame | MergedFrame] = {}
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # the chunk's, from the last call
        self.context: Context | None = None  # what the chunk attends to, built at its first call
        self.error: dict = {}  # by bits (or Summary()): the relative error of this layer's latest such frame
        self.unfolded: int | None = None  # the merged frame that still holds every place, where the next one merges

    def reset(self) -> None:
        self.keys = self.values = self.pending = self.unfolded = self.context = None
        self.compact, self.error = {}, {}

    def nbytes(self) -> int:
        exact = sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)
        return exact + sum(q.nbytes() for q in self.compact.values())

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

    def lower(self, frame: int, slot: int | None, tokens: int, bits, places: tuple | None) -> None:
        """Hold `frame` as `bits` says (8 or 4 bits, `TemporalMerge`, `Summary`, `KeepTokens`), from its exact `slot`
        (None: it is held in `compact` already, and only quantized frames are lowered further), or drop it from this
        layer (bits None). `places`: the (cos, sin) of each place within a frame. Records each quantization's relative error."""
        if bits is None:
            self.compact.pop(frame, None)
            return
        if slot is not None:
            rows = slice(slot * tokens, (slot + 1) * tokens)
            key, value = self.keys[:, rows], self.values[:, rows]
        else:
            stored = self.compact[frame]
            if isinstance(stored, MergedFrame) or not (isinstance(bits, Summary) or
                                                       isinstance(bits, int) and bits < stored.bits):
                return  # a frame merged stays so; one quantized is only lowered to fewer bits or its summary
            key, value = stored.keys(torch.float32), stored.values(torch.float32)
        if isinstance(bits, KeepTokens):
            self.compact[frame] = some_tokens(key, value, bits.index, frame)
            return
        if isinstance(bits, Summary):
            self.compact[frame] = q = summary(key, value, *places, frame, self.keys.dtype)
            rotated = rotate(key.float(), *places)
            error = ((rotated - q.key.float()).square().sum() + (value.float() - q.value.float()).square().sum()) / (
                rotated.square().sum() + value.float().square().sum()).clamp(min=1e-12)
            self.error[bits] = error.sqrt().item()
            return
        if isinstance(bits, TemporalMerge):
            merged = whole_frame(key, value, frame)
            if self.unfolded in self.compact:
                self.compact[self.unfolded] = fold(self.compact[self.unfolded], merged, bits.keep)
            self.compact[frame], self.unfolded = merged, frame
            return
        self.compact[frame] = q = quantize_frame(key, value, bits)
        error = ((q.keys(torch.float32) - key.float()).square().sum() + (q.values(torch.float32) - value.float())
                 .square().sum()) / (key.float().square().sum() + value.float().square().sum()).clamp(min=1e-12)
        self.error[bits] = error.sqrt().item()


@dataclass
class Context:
    """What a layer's chunk attends to: the held frames' rotated keys and values, then the chunk's, (B, (held + chunk)
    tokens, heads, head_dim) each; the merged tokens' logit corrections (B, tokens) or None; the held frames in key
    order and the tokens each holds."""

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None
    frames: list[int]
    sizes: list[int]

    def part(self) -> tuple:
        """This context as one of `_join`'s parts."""
        return self.frames, self.sizes, self.keys, self.values, self.bias


def _join(parts: list[tuple]) -> Context:
    """One context of parts (frames, their tokens, keys, values, logit corrections or None), in order."""
    bias = None
    if any(b is not None for *_, b in parts):
        bias = torch.cat([k.new_zeros(k.shape[:2], dtype=torch.float32) if b is None else b
                          for _, _, k, _, b in parts], 1)
    return Context(torch.cat([k for _, _, k, _, _ in parts], 1), torch.cat([v for _, _, _, v, _ in parts], 1), bias,
                   [f for frames, *_ in parts for f in frames], [n for _, sizes, *_ in parts for n in sizes])


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
        self.head_dim = rope.t_dim + rope.h_dim + rope.w_dim
        if config.quant is not None:
            config.quant.check(self.head_dim)
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
        self.compact: list[int] = []  # frames held quantized or merged in at least one layer, oldest first
        self.frames_made = 0  # frames committed so far; the pending chunk's first frame has this index
        # for a config that scores attention: per layer, the mass each held frame received lately
        self.attention: dict[int, list[float]] = {}
        # for a config that scores tokens: per exact frame and layer, the mass each of its tokens received, (tokens,)
        self.token_attention: dict[int, list[torch.Tensor | None]] = {}
        self._rotary: dict = {}

    @property
    def held(self) -> list[int]:
        """The frames held, oldest first."""
        return sorted([*self.slot_of, *self.compact])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def frame_bytes(self, bits: int | Summary | None = None) -> int:
        """One frame's keys and values at one layer, exact (bits None), in `bits` bits or as its summary; from the
        pending chunk."""
        key = self.layers[0].pending[0]  # (B, chunk tokens, heads, head_dim)
        batch, heads, tokens = key.shape[0], key.shape[2], self.layout.tokens
        if bits is None:
            return exact_bytes(batch, tokens, heads, key.shape[3], key.element_size())
        if isinstance(bits, Summary):
            return merged_bytes(batch, 1, heads, key.shape[3], key.element_size())
        return quantized_bytes(batch, tokens, heads, key.shape[3], bits)

    def _exact_slots(self) -> list[int]:
        return [s for s, f in enumerate(self.slot_frames) if f >= 0]

    def rotary(self, device: torch.device) -> dict:
        """(cos, sin) for the exact slots in slot order ("exact"), for each group of compact frames ("groups", with
        the frames), and for the pending chunk ("chunk"); all by the config's positions. "oldest": the oldest frame
        held, from which merged tokens count the frames they stand for."""
        if not self._rotary:
            held_positions, chunk_positions = self.config.positions(self.held, self.layout.chunk_frames)
            position_of = dict(zip(self.held, held_positions))
            size = self.config.group_frames()
            size = size if isinstance(size, int) else max(1, len(self.compact))
            groups = [self.compact[i:i + size] for i in range(0, len(self.compact), size)]
            self._rotary = {
                "exact": self.positions([position_of[self.slot_frames[s]] for s in self._exact_slots()], device),
                "groups": [(g, *self.positions([position_of[f] for f in g], device)) for g in groups],
                "chunk": self.positions(chunk_positions, device),
                "oldest": self.held[0] if self.held else self.frames_made,
            }
        return self._rotary

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention) -> torch.Tensor:
        """The pending chunk's attention output at layer `layer`, from its un-rotated query, key and value
        (B, tokens, heads, head_dim); `attention(q, k, v, bias)` is the model's attention over whole tensors. The
        chunk's key and value are kept as pending (`commit` stores those of the last call)."""
        rotary, store = self.rotary(query.device), self.layers[layer]
        store.pending = (key, value)
        query, keys, values = rotate(query, *rotary["chunk"]), rotate(key, *rotary["chunk"]), value
        scores = [] if self.config.scores_attention else None  # (frames, their tokens, sampled queries' logits)
        sample = _query_sample(query, self.config.query_sample) if scores is not None else None
        slots, rebuild = self._exact_slots(), self.config.group_frames()
        if store.compact and isinstance(rebuild, int):  # a group of frames rebuilt at a time
            out = blockwise_attention(query, self._blockwise(store, rotary, slots, keys, values, sample, scores))
        elif slots or store.compact:
            context = self._context(store, rotary, slots, keys, values, compact=rebuild == REBUILD_ONCE)
            if store.compact and rebuild is None:  # rebuilt at every call, a layer's at a time
                context = _join([*self._compact(store, rotary, keys), context.part()])
            out = attention(query, context.keys, context.values, context.bias)
            if scores is not None:
                held = sum(context.sizes)
                logits = _logits(sample, context.keys[:, :held])
                if context.bias is not None:
                    logits = logits + context.bias[:, None, None, :held]
                scores.append((context.frames, context.sizes, logits))
        else:
            out = attention(query, keys, values, None)
        if scores:
            self._score(layer, scores)
        return out

    def _context(self, store: KVLayer, rotary: dict, slots: list[int], keys: torch.Tensor, values: torch.Tensor,
                 compact: bool) -> Context:
        """The exact frames' rotated keys and values (with `compact`, after the layer's compact frames, rebuilt in
        full precision), followed by the chunk's (rotated) `keys` and `values`. The held frames are the same at every
        call on one chunk, so a bounded policy builds them once a chunk (Ca2-VDM shares them so across steps) and
        later calls rewrite only the chunk's tail, at the cost of this copy's memory while the chunk is made; an
        unbounded one (full KV) builds them at every call rather than double a cache that grows without end."""
        if store.context is not None:
            store.context.keys[:, -keys.shape[1]:], store.context.values[:, -values.shape[1]:] = keys, values
            return store.context
        parts = list(self._compact(store, rotary, keys)) if compact else []
        if slots:
            parts.append(self._exact(store, rotary, slots))
        context = _join(parts + [([], [], keys, values, None)])
        if self.config.capacity(self.layout.chunk_frames) is not None:
            store.context = context
        return context

    def _blockwise(self, store: KVLayer, rotary: dict, slots: list[int], keys: torch.Tensor, values: torch.Tensor,
                   sample, scores):
        """The keys, values and logit corrections (None: none) attended to, block by block, as `blockwise_attention`
        takes them: each group of the layer's compact frames, then the exact frames with the chunk; the sampled
        queries' logits over each added to `scores`."""
        for frames, sizes, group_keys, group_values, bias in self._compact(store, rotary, keys):
            if scores is not None:
                logits = _logits(sample, group_keys)
                scores.append((frames, sizes, logits if bias is None else logits + bias[:, None, None]))
            yield group_keys, group_values, bias
        if slots:
            frames, sizes, held_keys, held_values, _ = self._exact(store, rotary, slots)
            if scores is not None:
                scores.append((frames, sizes, _logits(sample, held_keys)))
            keys, values = torch.cat([held_keys, keys], 1), torch.cat([held_values, values], 1)
        yield keys, values, None

    def _exact(self, store: KVLayer, rotary: dict, slots: list[int]) -> tuple:
        """The layer's exact frames, in slot order, as one of `_join`'s parts: their keys rotated."""
        held_keys, held_values = store.exact(slots, self.layout.tokens)
        return ([self.slot_frames[s] for s in slots], [self.layout.tokens] * len(slots),
                rotate(held_keys, *rotary["exact"]), held_values, None)

    @staticmethod
    def _compact(store: KVLayer, rotary: dict, keys: torch.Tensor):
        """Each group of the compact frames this layer holds, rebuilt in full precision one group at a time: (its
        frames, their tokens, rotated keys, values, logit corrections or None)."""
        for frames, cos, sin in rotary["groups"]:
            present = [i for i, f in enumerate(frames) if f in store.compact]
            if not present:
                continue
            stored = [store.compact[frames[i]] for i in present]
            merged = [q for q in stored if isinstance(q, MergedFrame)]
            if merged:  # each held token takes its own place's rotation
                batch = keys.shape[0]
                by_frame = [t.unflatten(1, (len(frames), -1)) for t in (cos, sin)]  # (1, frames, tokens, 1, D)
                cos, sin = (torch.cat([t[0, i][q.place.long()] if isinstance(q, MergedFrame) else
                                       t[:, i].expand(batch, -1, -1, -1) for i, q in zip(present, stored)], 1)
                            for t in by_frame)
            elif len(present) < len(frames):  # this layer dropped some of the group's frames
                cos, sin = (t.unflatten(1, (len(frames), -1))[:, present].flatten(1, 2) for t in (cos, sin))
            group_keys = rotate(torch.cat([q.keys(keys.dtype) for q in stored], 1), cos, sin)
            bias = torch.cat([q.log_count(rotary["oldest"]) if isinstance(q, MergedFrame) else
                              torch.zeros(keys.shape[0], len(q), device=keys.device)
                              for q in stored], 1) if merged else None
            yield ([frames[i] for i in present], [len(q) for q in stored], group_keys,
                   torch.cat([q.values(keys.dtype) for q in stored], 1), bias)

    def _score(self, layer: int, scores: list) -> None:
        """Add to each held frame, at `layer`, the attention mass that the sampled queries give its tokens (the
        softmax taken over the held keys, averaged over the batch, heads and queries)."""
        frames = [f for block, _, _ in scores for f in block]
        sizes = [n for _, block, _ in scores for n in block]
        mass = torch.cat([logits for _, _, logits in scores], -1).softmax(-1).mean((0, 1, 2))
        if len(set(sizes)) == 1:
            per_frame = mass.unflatten(0, (len(frames), -1)).sum(-1)
        else:
            per_frame = torch.stack([m.sum() for m in mass.split(sizes)])
        for frame, m in zip(frames, per_frame.tolist()):
            self.attention.setdefault(frame, [0.0] * len(self.layers))[layer] += m
        if self.config.scores_tokens:
            for frame, tokens in zip(frames, mass.split(sizes)):
                if frame in self.slot_of:
                    per_layer = self.token_attention.setdefault(frame, [None] * len(self.layers))
                    per_layer[layer] = tokens if per_layer[layer] is None else per_layer[layer] + tokens

    def commit(self) -> None:
        """Store the pending chunk (the keys and values of the last call): first evict and lower held frames as
        the config says (`KVConfig.evict`, `KVConfig.precision`), then write the chunk into the free slots."""
        if any(layer.pending is None for layer in self.layers):
            raise RuntimeError("commit() needs a call on the pending chunk first")
        chunk = list(range(self.frames_made, self.frames_made + self.layout.chunk_frames))
        mean = {f: sum(m) / len(m) for f, m in self.attention.items()}
        for frame in self.config.evict(self.held, len(chunk), mean):
            self._lower(frame, [None] * len(self.layers))
        for frame, bits in self.config.precision(self, self.held + chunk).items():
            self._lower(frame, bits)
        free = [s for s, f in enumerate(self.slot_frames) if f < 0][:len(chunk)]
        new = len(chunk) - len(free)
        slots = free + list(range(len(self.slot_frames), len(self.slot_frames) + new))
        self.slot_frames += [-1] * new
        for frame, slot in zip(chunk, slots):
            self.slot_frames[slot], self.slot_of[frame] = frame, slot
        capacity = self.config.exact_capacity(self)
        for layer in self.layers:
            layer.write(slots, self.layout.tokens, capacity)
            layer.context = None
        if self.config.scores_attention:
            self.attention = {f: [m * self.config.decay for m in ms] for f, ms in self.attention.items()}
            self.token_attention = {f: [None if m is None else m * self.config.decay for m in ms]
                                    for f, ms in self.token_attention.items()}
        self.frames_made += len(chunk)
        self._rotary = {}

    def _lower(self, frame: int, bits: list[int | None]) -> None:
        """Store a held frame in bits[i] bits at layer i, or drop it there (None): never in more bits than now."""
        if frame >= self.frames_made:
            raise ValueError(f"frame {frame} is not committed yet: the pending chunk is stored exact")
        slot = self.slot_of.pop(frame, None)
        if slot is not None:
            self.slot_frames[slot] = -1
        self.token_attention.pop(frame, None)  # scored only while exact
        places = None  # the rotation of each place within a frame, for a summary
        if any(isinstance(b, Summary) for b in bits):
            places = self.positions([0], self.layers[0].keys.device)
        for layer, b in zip(self.layers, bits, strict=True):
            if slot is not None or frame in layer.compact:
                layer.lower(frame, slot, self.layout.tokens, b, places)
        if not any(frame in layer.compact for layer in self.layers):
            self.attention.pop(frame, None)
            if frame in self.compact:
                self.compact.remove(frame)
        elif frame not in self.compact:
            bisect.insort(self.compact, frame)


def _query_sample(query: torch.Tensor, size: int) -> torch.Tensor:
    """About `size` of the chunk's (rotated) queries, scaled: (B, heads, size, head_dim), float."""
    return query[:, ::max(1, query.shape[1] // size)].transpose(1, 2).float() * query.shape[-1] ** -0.5


def _logits(sample: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The sampled queries' attention logits over keys (B, N, heads, head_dim): (B, heads, size, N)."""
    return sample @ keys.transpose(1, 2).float().transpose(-1, -2)
