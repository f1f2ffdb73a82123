"""`tempocache.edit`: an image and an instruction in, the edited image out, with the reference editor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .generation import check_output_path, load_pipeline
from .reference.pipeline import ShapesPipeline

ImageInput = Image.Image | np.ndarray | torch.Tensor | str | Path


def load_image(image: ImageInput, size: int) -> torch.Tensor:
    """`image` as (3, size, size) float32 in [0, 1]: a file Pillow reads, a PIL image in mode RGB, an (H, W, 3)
    array (uint8, or floats in [0, 1]) or a (3, H, W) tensor in [0, 1]; a ValueError naming what is wrong otherwise."""
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise ValueError(f"no image file {str(image)!r}")
        with Image.open(image) as opened:
            opened.load()
            image = opened.copy()
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"the image is in mode {image.mode!r}: the editor takes RGB (image.convert('RGB'))")
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be (H, W, 3) RGB, got shape {image.shape}")
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255
        image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"an image is a file path, a PIL image, an array or a tensor, not {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"an image tensor must be (3, H, W) RGB, got shape {tuple(image.shape)}")
    if tuple(image.shape[1:]) != (size, size):
        raise ValueError(f"the editor edits {size}x{size} images, got {image.shape[2]}x{image.shape[1]} (width x height)")
    image = image.float()
    if not bool(((image >= 0) & (image <= 1)).all()):
        raise ValueError("image values must be in [0, 1] (or uint8 in an array)")
    return image


def edit(
    image: ImageInput | list[ImageInput],
    instruction: str | list[str],
    model: str = "shapes-edit",
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    pipe: ShapesPipeline | None = None,
) -> np.ndarray:
    """The edited image (H, W, 3) float32 in [0, 1]; for lists of images and instructions (pairs, in order), the
    edited images (N, H, W, 3), pair i drawn with seed `seed + i`. Everything is checked before any sampling.

    Pass `pipe` to reuse a loaded editor (e.g. one with `tempocache.enable(pipe, tempocache.RegionE())`)."""
    single = isinstance(instruction, str)
    images = [image] if single else list(image) if isinstance(image, (list, tuple)) else [image]
    instructions = [instruction] if single else list(instruction)
    if len(images) != len(instructions):
        raise ValueError(f"got {len(images)} images for {len(instructions)} instructions")
    pipe = pipe or load_pipeline(model, device)
    if pipe.spec.task != "edit":
        raise ValueError(f"{pipe.spec.name} is not an editor: editing takes an image-editing model (shapes-edit)")
    size = pipe.spec.size
    batch = torch.stack([load_image(i, size) for i in images])
    out = pipe(instructions, num_inference_steps=steps, guidance_scale=guidance, seed=seed, image=batch).frames[:, 0]
    return out[0] if single else out


def check_image_path(path: Path) -> None:
    """An edited image is written as .png into a folder that exists."""
    check_output_path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output {str(path)!r}: an edited image is written as .png")


def save_image(image: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write an (H, W, 3) image in [0, 1] as PNG, each pixel `scale` x `scale`."""
    path = Path(path)
    check_image_path(path)
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST).save(path)
    return path
