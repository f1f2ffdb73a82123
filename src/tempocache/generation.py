"""`tempocache.generate`: captions in, clips out, with a shipped reference model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image

from .reference.pipeline import ShapesPipeline

OUTPUT_SUFFIXES = (".gif", ".png")


def load_pipeline(model: str = "shapes-t2v", device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> ShapesPipeline:
    """A fresh pipeline for a shipped model, loaded from the package's own files (no network)."""
    return ShapesPipeline.from_reference(model, check_device(device), dtype)


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch device this machine has; a ValueError naming what is accepted otherwise."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device: give cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}); use cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the shipped models run on cpu or cuda")
    return parsed


def generate(
    prompts: str | list[str],
    model: str = "shapes-t2v",
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    num_frames: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    pipe: ShapesPipeline | None = None,
) -> np.ndarray:
    """Clips (N, T, H, W, 3) float32 in [0, 1], prompt i drawn with seed `seed + i`.

    Every prompt and setting is checked before any sampling starts. Pass `pipe` to
    reuse a loaded pipeline; otherwise one is loaded for `model` on `device`.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    pipe = pipe or load_pipeline(model, device)
    spec = pipe.spec
    if spec.task == "edit":
        raise ValueError(f"{spec.name} is an editor, which takes an image and an instruction: use "
                         f"tempocache.edit(image, instruction) or `tempocache edit IMAGE INSTRUCTION`")
    settings = dict(
        num_inference_steps=spec.default_steps if steps is None else steps,
        guidance_scale=spec.default_guidance if guidance is None else guidance,
        num_frames=spec.num_frames if num_frames is None else num_frames,
        height=spec.size,
        width=spec.size,
    )
    pipe.check_inputs(prompts, *settings.values())
    clips = [
        pipe(prompts[i : i + batch_size], seed=[seed + j for j in range(i, min(i + batch_size, len(prompts)))], **settings).frames
        for i in range(0, len(prompts), batch_size)
    ]
    return np.concatenate(clips)


def check_output_path(path: Path) -> None:
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {str(path)!r} must end in one of: {', '.join(OUTPUT_SUFFIXES)}")
    if not path.parent.resolve().is_dir():
        raise ValueError(f"output folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"output {str(path)!r} is a folder; give a file name ending in one of: {', '.join(OUTPUT_SUFFIXES)}")


def save_clips(clips: np.ndarray, path: str | Path, fps: float = 8.0, scale: int = 4) -> Path:
    """Write clips (N, T, H, W, 3) side by side: an animated GIF, or a PNG with one row per clip.

    The file is written whole or not at all.
    """
    path = Path(path)
    check_output_path(path)
    pixels = (np.asarray(clips) * 255).round().astype(np.uint8).repeat(scale, 2).repeat(scale, 3)
    pixels = np.pad(pixels, ((0, 0), (0, 0), (scale, scale), (scale, scale), (0, 0)))  # a dark gap between clips
    n, t, h, w, _ = pixels.shape
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        if path.suffix.lower() == ".gif":
            _write_gif(tmp, pixels.transpose(1, 2, 0, 3, 4).reshape(t, h, n * w, 3), fps)
        else:
            iio.imwrite(tmp, pixels.transpose(0, 2, 1, 3, 4).reshape(n * h, t * w, 3))
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _write_gif(path: str, frames: np.ndarray, fps: float) -> None:
    # One palette for the whole clip: about half the size of a palette per frame, and no colour flicker.
    palette = Image.fromarray(frames.reshape(-1, frames.shape[2], 3)).quantize(256, dither=Image.Dither.NONE)
    images = [Image.fromarray(frame).quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=1000 / fps, loop=0)
