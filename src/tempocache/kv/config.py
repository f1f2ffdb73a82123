"""The one config type of the streaming KV cache, and the reference policy: keep every frame."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .quantized import KVQuant

if TYPE_CHECKING:
    from .cache import KVCache

COMMITS = ("reencode", "last_step")


@dataclass(frozen=True)
class KVConfig:
    """Base of every KV policy: which committed frames to hold, and at which rotary positions to read them.

    commit: how a finished chunk enters the cache: "reencode" runs the clean chunk through the model once
    more and stores those keys and values (Self-Forcing, Ca2-VDM); "last_step" stores the keys and values
    of its last denoising step, saving that pass (StreamDiffusionV2).
    quant: store frames older than the newest few in 8 or 4 bits (`kv.KVQuant`, KIVI), or None.
    """

    commit: str = "reencode"
    quant: KVQuant | None = None

    def check(self, chunk_frames: int) -> None:
        """Raise ValueError, before any compute, if this policy cannot run with chunks of `chunk_frames` frames."""
        if self.commit not in COMMITS:
            raise ValueError(f"commit must be one of {COMMITS}, got {self.commit!r}")
        if self.quant is not None and not isinstance(self.quant, KVQuant):
            raise TypeError(f"quant must be a kv.KVQuant (e.g. kv.KVQuant(bits=8)) or None, "
                            f"got {type(self.quant).__name__}")

    def capacity(self, chunk_frames: int) -> int | None:
        """The most frames ever held (None: no bound)."""
        return None

    def check_budget(self, frame_bytes: int, chunk_frames: int) -> None:
        """Raise ValueError, before any compute, if a budget in bytes cannot hold what must be held; `frame_bytes`:
        one frame's keys and values in every layer."""

    def exact_capacity(self, cache: KVCache) -> int | None:
        """The most frames ever held exact (None: no bound): with quant, the newest `recent_frames` or the chunk."""
        chunk_frames = cache.layout.chunk_frames
        held = self.capacity(chunk_frames)
        if self.quant is None:
            return held
        exact = max(self.quant.recent_frames, chunk_frames)
        return exact if held is None else min(held, exact)

    def compacts(self) -> bool:
        """Whether some frames are held other than exact (quantized or merged)."""
        return self.quant is not None

    def group_frames(self) -> int | str | None:
        """Quantized frames rebuilt in full precision at a time while attending, block by block (None: a layer's at
        every call; "chunk": a layer's once a chunk, held for its steps)."""
        return self.quant.group_frames if self.quant is not None else None

    scores_attention = False  # whether the cache measures the attention mass each held frame receives, per layer
    scores_tokens = False  # and, with it, the mass each token of an exact frame receives

    def evict(self, held: list[int], chunk_frames: int, attention: dict[int, float] | None = None) -> list[int]:
        """The frames to drop before a chunk of `chunk_frames` frames is stored; `held` oldest first; `attention`: the
        attention mass each received lately, for a config that `scores_attention`."""
        return []

    def precision(self, cache: KVCache, frames: list[int]) -> dict[int, list]:
        """Held frames to store in less, each with its form per layer: 8 or 4 bits, `merged.TemporalMerge`,
        `merged.Summary`, or None (dropped there); asked at each commit with `frames` the held frames and the chunk's,
        oldest first. Frames not named keep their storage. With quant: every frame but the newest `recent_frames`,
        in quant.bits."""
        if self.quant is None:
            return {}
        older = frames[:max(0, len(frames) - self.quant.recent_frames)]
        return {f: [self.quant.bits] * len(cache.layers) for f in older if f < cache.frames_made}

    def positions(self, held: list[int], chunk_frames: int) -> tuple[list[int], list[int]]:
        """Rotary positions of the held frames (oldest first) and of the pending chunk's: by rank, so a frame's
        position is its place among the frames attended to, and never grows past the window."""
        return list(range(len(held))), list(range(len(held), len(held) + chunk_frames))


@dataclass(frozen=True)
class FullKV(KVConfig):
    """Every frame kept: the reference every bounded policy is measured against. Memory grows with length."""


def check_frames(name: str, value, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer of at least {least} frames, got {value!r}")


def check_one_budget(policy: str, memory, memory_frames) -> None:
    """A memory budget given one way: `memory` bytes (a positive integer) or `memory_frames` frames."""
    if (memory is None) == (memory_frames is None):
        raise ValueError(f"{policy} needs one budget: memory=bytes or memory_frames=frames")
    if memory_frames is not None:
        check_frames("memory_frames", memory_frames)
    elif isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
        raise ValueError(f"memory must be a positive number of bytes, got {memory!r}")


def check_scoring(query_sample, decay) -> None:
    """The knobs of a policy that scores the attention its frames receive: queries sampled per call, and what is left
    of a score after each commit."""
    check_frames("query_sample", query_sample)
    if not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
        raise ValueError(f"decay must be between 0 and 1, got {decay!r}")
