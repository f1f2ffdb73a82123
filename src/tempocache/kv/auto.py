"""`kv.Auto`, ours: a KV cache that fits a memory budget, deciding per layer and per frame from the model's attention.

Within a context of `frames` frames, the newest frames are kept exact, as many as the budget
allows while still holding the whole context in 4 bits; every older frame is stored, layer by
layer, in 8 bits, in 4 bits (KIVI's quantizer, `quantized.py`) or not at all. What goes where
is read off two profiles measured as the stream runs: the attention mass that a sample of each
chunk's queries gives each held frame at each layer (as H2O scores tokens), and the relative
error that quantizing in 8 and in 4 bits makes at each layer. A (layer, frame) is worth its
attention mass times the share of its keys and values that survives quantization; the budget
left after the exact frames is spent greedily, worth per byte, on holding a frame in 4 bits
at a layer or raising it to 8. A frame only ever loses precision as it ages. `frames` bounds
what is held: a model trained on clips of T frames has attended to at most T - chunk frames
before its chunk (positions are by rank, `rope.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import check_frames, check_one_budget, check_scoring
from .merged import Summary
from .quantized import REBUILD_ONCE
from .window import SlidingWindow

if TYPE_CHECKING:
    from .cache import KVCache

@dataclass(frozen=True)
class Auto(SlidingWindow):
    """memory: the budget in bytes (the cache's allocated keys and values, every layer); memory_frames: or in frames,
    the bytes of that many frames kept exact; frames: the most frames held (the context); exact_frames: the newest
    frames kept exact (default: chosen from the budget); query_sample, decay: the attention profile's queries per
    call and what is left of a frame's mass after each commit; rebuild_frames: quantized frames rebuilt in full
    precision at a time while attending, block by block (None: a layer's at once at every call, read by fused
    attention; "chunk": a layer's once a chunk, held for its steps: faster, every layer's in full precision at once);
    summaries: hold an older frame at least as its mean token (soft pruning's summary) where it would be dropped."""

    frames: int = 28
    memory: int | None = None
    memory_frames: int | None = None
    exact_frames: int | None = None
    query_sample: int = 64
    decay: float = 0.5
    rebuild_frames: int | str | None = None
    summaries: bool = False
    scores_attention = True

    def check(self, chunk_frames: int) -> None:
        super().check(chunk_frames)
        if self.quant is not None:
            raise ValueError("Auto chooses the bits of each layer and frame itself: leave quant None")
        check_one_budget("Auto", self.memory, self.memory_frames)  # memory_frames: kept exact
        if self.exact_frames is not None:
            check_frames("exact_frames", self.exact_frames, least=chunk_frames)
            if self.exact_frames > self.frames:
                raise ValueError(f"exact_frames ({self.exact_frames}) cannot exceed frames ({self.frames})")
        least = self.exact_frames or chunk_frames
        if self.memory_frames is not None and self.memory_frames < least:
            raise ValueError(f"a budget of {self.memory_frames} frames is less than the {least} frames kept exact "
                             f"(one chunk at least): use memory_frames >= {least}")
        check_scoring(self.query_sample, self.decay)
        rebuild = self.rebuild_frames
        if rebuild not in (None, REBUILD_ONCE) and (isinstance(rebuild, bool) or not isinstance(rebuild, int) or
                                                    rebuild < 1):
            raise ValueError(f"rebuild_frames must be None, {REBUILD_ONCE!r} or an integer of at least 1 frame, "
                             f"got {rebuild!r}")

    def check_budget(self, frame_bytes: int, chunk_frames: int) -> None:
        if self.memory is not None and self.memory < (self.exact_frames or chunk_frames) * frame_bytes:
            raise ValueError(f"a budget of {self.memory} bytes is less than the KV of the {self.exact_frames or chunk_frames}"
                             f" frames kept exact ({frame_bytes} bytes a frame, every layer): raise memory")

    def compacts(self) -> bool:
        return True

    def group_frames(self) -> int | str | None:
        return self.rebuild_frames

    def budget(self, cache: KVCache) -> int:
        """The budget in bytes."""
        return self.memory if self.memory is not None else self.memory_frames * len(cache.layers) * cache.frame_bytes()

    def exact_capacity(self, cache: KVCache) -> int:
        if self.exact_frames is not None:
            return self.exact_frames
        layers, exact, low = len(cache.layers), cache.frame_bytes(), cache.frame_bytes(min(self._bits(cache)))
        for frames in range(self.frames, cache.layout.chunk_frames, -1):
            if layers * (frames * exact + (self.frames - frames) * low) <= self.budget(cache):
                return frames
        return cache.layout.chunk_frames

    @staticmethod
    def _bits(cache: KVCache) -> tuple[int, ...]:
        return (8, 4) if cache.head_dim % 2 == 0 else (8,)  # 4-bit codes pack in pairs along the head dimension

    def precision(self, cache: KVCache, frames: list[int]) -> dict[int, list]:
        exact = self.exact_capacity(cache)
        older = frames[:max(0, len(frames) - exact)]
        if not older:
            return {}
        layers, bits = range(len(cache.layers)), self._bits(cache)
        left = self.budget(cache) - len(layers) * exact * cache.frame_bytes()
        cost = {b: cache.frame_bytes(b) for b in bits}

        def now(frame: int, layer: int) -> int:  # the bits it is stored in there (16 exact, 1 a summary, 0 dropped)
            stored = cache.layers[layer].compact.get(frame)
            return 16 if frame in cache.slot_of else 0 if stored is None else getattr(stored, "bits", 1)

        def kept(layer: int, b) -> float:  # the share of a frame's keys and values that b bits (or a summary) keep
            guess = 0.1 if isinstance(b, Summary) else 1 - 2.0**-b  # until measured (a uniform quantizer's error)
            return 1 - cache.layers[layer].error[b] if b in cache.layers[layer].error else guess

        # with summaries every frame held is at least its mean token there, paid for first, newest first
        plan, summary = {f: [None for _ in layers] for f in older}, Summary()
        cost[summary] = cache.frame_bytes(summary)
        if self.summaries:
            for f in reversed(older):
                for i in layers:
                    if now(f, i) >= 1 and cost[summary] <= left:
                        plan[f][i], left = summary, left - cost[summary]

        low, options = min(bits), []  # (worth per byte, frame, layer, bits), for holding in `low`, raising to 8
        for f in older:
            mass = cache.attention.get(f, [0.0] * len(layers))
            for i in layers:
                base = plan[f][i] == summary
                if now(f, i) >= low:
                    options.append((mass[i] * (kept(i, low) - base * kept(i, summary)) /
                                    (cost[low] - base * cost[summary]), f, i, low))
                if low == 4 and now(f, i) >= 8:
                    options.append((mass[i] * (kept(i, 8) - kept(i, 4)) / (cost[8] - cost[4]), f, i, 8))
        options.sort(key=lambda o: (-o[0], -o[1], o[2], -o[3]))
        for _ in range(2):  # a second pass raises what was held only after its raise came up
            for _, f, i, b in options:
                held = plan[f][i]
                step = cost[b] - (cost[low] if b != low else cost[summary] if held == summary else 0)
                if step <= left and (not isinstance(held, int) if b == low else held == low):
                    plan[f][i], left = b, left - step
        return plan
