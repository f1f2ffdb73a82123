"""Rotary positions at read time (Infinity-RoPE, Yesiltepe et al. 2025; Rolling Forcing, Liu et al. 2025).

Keys are stored before rotation. Each time the chunk being made attends to the cache, every
held frame is given a position (by the window policy: usually its rank among the frames
held) and its keys are rotated there, and the chunk's queries and keys are rotated to the
positions after them. Positions so stay within the window however long the stream runs;
the frequencies are computed for any position, so none ever runs past a table.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from torch import nn


class FramePositions:
    """The (cos, sin) of a Wan-style 3-D rotary embedding (`rope`: the model's WanRotaryPosEmbed or
    SkyReelsV2RotaryPosEmbed) for tokens laid out frame by frame, each frame a (rows, cols) grid."""

    def __init__(self, rope: nn.Module, rows: int, cols: int, theta: float = 10000.0):
        self.t_dim, self.theta = rope.t_dim, theta
        split = (rope.t_dim, rope.h_dim, rope.w_dim)  # the tables stay on the CPU; each call moves its result
        cos, sin = rope.freqs_cos.cpu().split(split, dim=1), rope.freqs_sin.cpu().split(split, dim=1)
        # (rows * cols, h_dim + w_dim): the within-frame part, the same for every frame
        def grid(table: tuple[torch.Tensor, ...]) -> torch.Tensor:
            rows_part, cols_part = table[1][:rows, None].expand(rows, cols, -1), table[2][None, :cols].expand(rows, cols, -1)
            return torch.cat([rows_part, cols_part], -1).flatten(0, 1)

        self.grid_cos, self.grid_sin = grid(cos), grid(sin)
        t_cos, _ = self._time(np.arange(8))
        if not torch.allclose(t_cos.to(cos[0].dtype).float(), cos[0][:8].float(), atol=1e-2):
            raise ValueError(f"{type(rope).__name__}'s temporal frequencies are not those of theta={theta}")

    def _time(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = get_1d_rotary_pos_embed(self.t_dim, positions.astype(np.float64), self.theta, use_real=True,
                                           repeat_interleave_real=True, freqs_dtype=torch.float64)
        return cos, sin

    def __call__(self, positions: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (1, len(positions) * rows * cols, 1, head_dim), for frames at `positions` in that order."""
        t_cos, t_sin = self._time(np.asarray(positions))
        tokens = self.grid_cos.shape[0]
        out = []
        for t, grid in ((t_cos, self.grid_cos), (t_sin, self.grid_sin)):
            t = t.to(grid)[:, None].expand(-1, tokens, -1)
            full = torch.cat([t, grid[None].expand(len(positions), -1, -1)], -1)
            out.append(full.flatten(0, 1)[None, :, None].to(device))
        return out[0], out[1]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, N, heads, head_dim) by (cos, sin) (1, N, 1, head_dim), pairs interleaved, as Wan's processor does."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)
