"""No cache: each denoising step re-runs the newest clean frames with the chunk.

What a pipeline without a KV cache does to keep a long video coherent (SkyReels-V2's
diffusion-forcing pipeline re-encodes its `overlap_history` frames for every new stretch):
the newest `frames` clean frames go back through the model beside the chunk, at noise level
0, under its block-causal mask. Until a frame leaves the window it computes what
`SlidingWindow(frames)` computes, at the cost of running the window's frames at every
step; after that the two part: a cached frame's keys and values keep the context it was
made in, a recomputed one sees only the window. The baseline a KV cache saves against.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import KVConfig, check_frames


@dataclass(frozen=True)
class Recompute(KVConfig):
    """frames: the newest clean frames re-run with each chunk (a multiple of the chunk: the model's blocks)."""

    frames: int = 12

    def check(self, chunk_frames: int) -> None:
        super().check(chunk_frames)
        check_frames("frames", self.frames, least=0)
        if self.frames % chunk_frames:
            raise ValueError(f"frames must be a multiple of the chunk size {chunk_frames} (the model's causal blocks), "
                             f"got {self.frames}")
        if self.quant is not None:
            raise ValueError("Recompute holds no keys and values to quantize")

    def capacity(self, chunk_frames: int) -> int:
        return 0
