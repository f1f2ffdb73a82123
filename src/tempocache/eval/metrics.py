"""Semantic accuracy of clips against their captions, and Fréchet distance, from the evaluator."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

from ..reference.shapesworld import BACKGROUND_NAMES, COLOUR_NAMES, MOTION_NAMES, SHAPES, Scene
from .evaluator import AttributeClassifier


@torch.no_grad()
def read_clips(evaluator: AttributeClassifier, clips: np.ndarray | torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Evaluator features (N, 256) and logits for clips (N, T, H, W, 3) in [0, 1]."""
    clips = torch.as_tensor(clips)
    device = next(evaluator.parameters()).device
    features, logits = [], []
    for chunk in clips.split(batch_size):
        f, out = evaluator(chunk.to(device))
        features.append(f.cpu())
        logits.append({k: v.cpu() for k, v in out.items()})
    merged = {k: torch.cat([o[k] for o in logits]).numpy() for k in logits[0]}
    return torch.cat(features).numpy(), merged


def semantic_accuracy(logits: dict[str, np.ndarray], scenes: list[Scene], with_motion: bool = True) -> dict[str, float]:
    """Fraction of captioned attributes the evaluator sees in the clips.

    An object's colour is right when an object of that colour is present; its shape
    and motion are right when the object of that colour has them. `count` checks the
    number of objects, `all` that every attribute of the clip is right.
    """
    present = logits["present"] > 0
    shape = logits["shape"].argmax(-1)
    motion = logits["motion"].argmax(-1)
    background = logits["background"].argmax(-1)
    hits: dict[str, list[bool]] = {"background": [], "colour": [], "shape": [], "motion": [], "count": [], "all": []}
    for i, scene in enumerate(scenes):
        clip_hits = [background[i] == BACKGROUND_NAMES.index(scene.background)]
        hits["background"].append(clip_hits[0])
        for obj in scene.objects:
            c = COLOUR_NAMES.index(obj.colour)
            found = bool(present[i, c])
            checks = {"colour": found, "shape": found and shape[i, c] == SHAPES.index(obj.shape)}
            if with_motion:
                checks["motion"] = found and motion[i, c] == MOTION_NAMES.index(obj.motion)
            for name, ok in checks.items():
                hits[name].append(ok)
                clip_hits.append(ok)
        hits["count"].append(int(present[i].sum()) == len(scene.objects))
        hits["all"].append(all(clip_hits))
    return {name: float(np.mean(values)) for name, values in hits.items() if values}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(root)))


# What a reference model must reach at full compute on held-out captions to be shown at a setting (README "Results").
ACCURACY_BARS = {"colour": 0.85, "shape": 0.85, "motion": 0.75}


def below_bars(accuracy: dict[str, float]) -> list[str]:
    """The attributes of a semantic accuracy under their bar, as "motion 0.38 < 0.75"."""
    return [f"{k} {accuracy[k]:.2f} < {bar}" for k, bar in ACCURACY_BARS.items() if k in accuracy and accuracy[k] < bar]
