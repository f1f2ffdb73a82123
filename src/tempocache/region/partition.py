"""Which tokens an edit changes: the one-step estimate of the clean image against the image being edited."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

CROSS = ndimage.generate_binary_structure(2, 1)  # erodes away lone tokens and one-token-wide lines
SQUARE = np.ones((5, 5), bool)  # then grows what is left by two tokens each way, to cover the edit's border


def token_similarity(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B, N) cosine similarity of each token of the estimate (B, N, C) with the reference's (B, N, C)."""
    return torch.nn.functional.cosine_similarity(estimate.float(), reference.float(), dim=-1)


def edited_tokens(similarity: torch.Tensor, threshold: float, grid: tuple[int, int], clean: bool = True) -> torch.Tensor:
    """(B, N) bool: tokens whose `token_similarity` (B, N) is below `threshold`, the N tokens on a `grid` (rows,
    columns); with `clean`, eroded then dilated on it."""
    edited = (similarity < threshold).reshape(-1, *grid).cpu().numpy()
    if clean:
        edited = np.stack([ndimage.binary_dilation(ndimage.binary_erosion(m, CROSS), SQUARE) for m in edited])
    return torch.from_numpy(edited).reshape(len(edited), -1).to(similarity.device)
