"""Fidelity of accelerated clips to the full-compute ones: PSNR, SSIM (per frame, averaged), relative L2."""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def fidelity(clips: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Mean over clips (N, T, H, W, 3) in [0, 1] of PSNR (dB, capped at 100 for identical clips), SSIM and relative L2."""
    psnr, ssim, rel = [], [], []
    for clip, ref in zip(clips, reference):
        psnr.append(100.0 if np.array_equal(clip, ref) else min(100.0, peak_signal_noise_ratio(ref, clip, data_range=1.0)))
        ssim.append(np.mean([structural_similarity(r, c, data_range=1.0, channel_axis=-1) for r, c in zip(ref, clip)]))
        rel.append(float(np.linalg.norm(clip - ref) / max(np.linalg.norm(ref), 1e-12)))
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "relative_l2": float(np.mean(rel))}
