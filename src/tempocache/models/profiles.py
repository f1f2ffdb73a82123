"""Profiles found by the model they were measured on.

A profile (the step cache's, or quantization's) records the fingerprint of the transformer it
was measured on: its class and its config. Packages that ship profiles register their files
(`register_profile`); `find_profile` returns the first registered file of a kind whose
fingerprint (and any other fields asked for) match a transformer. Weights are not part of
the fingerprint: a profile measured on one set of weights is found for a retrained model of
the same architecture, so after retraining, calibrate again and pass the new profile.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import nn

KINDS = ("step_cache", "quant")
_REGISTERED: dict[str, list[Path]] = {kind: [] for kind in KINDS}


def fingerprint(transformer: nn.Module) -> str:
    """A stable digest of a transformer's class, config (diffusers' `config`, private keys left out) and weights: the
    signs of a sample of its first parameter, which no cast or device move changes, so that two models of one
    architecture (a generator and the editor fine-tuned from it) never share a profile."""
    config = {k: v for k, v in dict(getattr(transformer, "config", {}) or {}).items() if not k.startswith("_")}
    text = json.dumps([type(transformer).__name__, config], sort_keys=True, default=list)
    first = next((p for p in transformer.parameters() if p.is_floating_point() and not p.is_meta), None)
    signs = b""
    if first is not None:
        flat = first.detach().flatten()
        signs = (flat[:: max(1, flat.numel() // 4096)][:4096] > 0).cpu().numpy().tobytes()
    return hashlib.sha256(text.encode() + signs).hexdigest()[:16]


def register_profile(kind: str, path: str | Path) -> None:
    """Make the profile file at `path` findable for the model it was measured on (read when first looked up)."""
    if kind not in KINDS:
        raise ValueError(f"unknown profile kind {kind!r}; accepted: {', '.join(KINDS)}")
    path = Path(path)
    if path not in _REGISTERED[kind]:
        _REGISTERED[kind].append(path)


def find_profile(kind: str, transformer: nn.Module, **fields) -> Path | None:
    """The first registered profile of `kind` measured on this transformer's architecture whose `fields` match."""
    wanted = {"fingerprint": fingerprint(transformer), **fields}
    for path in _REGISTERED[kind]:
        header = _header(path)
        if all(header.get(k) == v for k, v in wanted.items()):
            return path
    return None


def registered_profiles(kind: str) -> list[Path]:
    """Every registered profile file of `kind`, in registration order."""
    return list(_REGISTERED[kind])


def _header(path: Path) -> dict:
    """The scalar fields of a profile file."""
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if isinstance(v, (str, int, float))}
