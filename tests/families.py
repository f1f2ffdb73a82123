"""Tiny random-weight diffusers transformers for ten families, with pipeline-shaped forward inputs.

Built the way diffusers' own model tests build them (a few layers, 2 heads, hidden size 32-48), so a forward
takes milliseconds on CPU. `size` is the pipeline's latent height = width; flux, qwen-image and ltx take latents
packed into tokens as their pipelines pack them. The output always has the shape of `inputs()["hidden_states"]`.
Sizes: even for all families except ltx and sana (any size); sd3 at most 32 (pos_embed_max_size 16), wan at most
64 (rope_max_seq_len 32).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed

FAMILIES: tuple[str, ...] = (
    "wan", "flux", "pixart", "dit", "cogvideox", "hunyuan_video", "ltx", "sd3", "sana", "qwen_image",
)
TEXT_LEN = 6  # prompt tokens; where a family takes a prompt mask, the last two are padding
TEXT_DIM = 32  # width of the (fake) text-encoder states and pooled projections
FRAMES = 2  # latent frames of the video families

# (generator, batch, size, timestep of shape (batch,) on the 0..1000 scale) -> forward kwargs
InputFn = Callable[[torch.Generator, int, int, torch.Tensor], dict]


@dataclass
class TinyFamily:
    name: str
    transformer: torch.nn.Module
    block_lists: tuple[str, ...]
    make_inputs: InputFn = field(repr=False)

    def inputs(self, batch: int = 1, size: int = 8, timestep: float = 500.0, seed: int = 0) -> dict:
        """Keyword arguments for `transformer(**inputs, return_dict=False)`; deterministic for a seed."""
        generator = torch.Generator().manual_seed(seed)
        return self.make_inputs(generator, batch, size, torch.full((batch,), float(timestep)))


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _text(g: torch.Generator, batch: int) -> torch.Tensor:
    return _randn(g, batch, TEXT_LEN, TEXT_DIM)


def _text_mask(batch: int) -> torch.Tensor:
    mask = torch.ones(batch, TEXT_LEN)
    mask[:, -2:] = 0
    return mask


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), as the flux and qwen-image pipelines pack latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def _wan() -> tuple[torch.nn.Module, tuple[str, ...], InputFn]:
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=4, rope_max_seq_len=32,
    )

    def inputs(g: torch.Generator, batch: int, size: int, t: torch.Tensor) -> dict:
        return {"hidden_states": _randn(g, batch, 4, FRAMES, size, size), "timestep": t,
                "encoder_hidden_states": _text(g, batch)}

    return model, ("blocks",), inputs


def _flux() -> tuple[torch.nn.Module, tuple[str, ...], InputFn]:
    model = FluxTransformer2DModel(
        in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )

    def inputs(g: torch.Generator, batch: int, size: int, t: torch.Tensor) -> dict:
        img_ids = torch.zeros(size // 2, size // 2, 3)
        img_ids[..., 1] = torch.arange(size // 2)[:, None]
        img_ids[..., 2] = torch.arange(size // 2)[None, :]
        return {"hidden_states": _pack(_randn(g, batch, 4, size, size)), "encoder_hidden_states": _text(g, batch),
                "pooled_projections": _randn(g, batch, TEXT_DIM), "timestep": t / 1000,
                "img_ids": img_ids.reshape(-1, 3), "txt_ids": torch.zeros(TEXT_LEN, 3),
                "guidance": torch.full((batch,), 3.5)}

    return model, ("transformer_blocks", "single_transformer_blocks"), inputs


def _pixart() -> tuple[torch.nn.Module, tuple[str, ...], InputFn]:
    # inner dim 48: the resolution/aspect-ratio embeddings (PixArt-alpha 1024) need it divisible by 3
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4, num_layers=4,
        cross_attention_dim=48, caption_channels=TEXT_DIM, sample_size=8, use_additional_conditions=True,
    )

    def inputs(g: torch.Generator, batch: int, size: int, t: torch.Tensor) -> dict:
        added = {"resolution": torch.full((batch, 2), 8.0 * size), "aspect_ratio": torch.ones(batch, 1)}
        return {"hidden_states": _randn(g, batch, 4, size, size), "encoder_hidden_states": _text(g, batch),
                "encoder_attention_mask": _text_mask(batch), "timestep": t, "added_cond_kwargs": added}

    return model, ("transformer_blocks",), inputs


def _dit() -> tuple[torch.nn.Module, tuple[str, ...], InputFn]:
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=4, sample_size=8,
    )

    def inputs(g: torch.Generator, batch: int, size: int, t: torch.Tensor) -> dict:
        return {"hidden_states": _randn(g, batch, 4, size, size), "timestep": t,
                "class_labels": torch.randint(0, 1000, (batch,), generator=g)}

    return model, ("transformer_blocks",), inputs


def _cogvideox() -> tuple[torch.nn.Module, tuple[str, ...], InputFn]:
    # CogVideoX-5b layout: 3D RoPE computed by the caller, no sincos positional embedding
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=TEXT_DIM, num_layers=4, sample_width=8, sample_height=8, use_rotary_positional_embeddings=True,
    )

    def inputs(g: torch.Generator, batch: int, size: int, t: torch.Tensor) -> dict:
        grid, base = size // 2, 8 // 2
        # the pipeline's get_resize_crop_region_for_grid gives the whole base grid for a square latent
        rope = get_3d_rotary_pos_embed(32, ((0, 0), (base, base)), (grid, grid), FRAMES)
        return {"hidden_states": _randn(g, batch, FRAMES, 4, size, size), "encoder_hidden_states": _text(g, batch),
                "timestep": t, "image_rotary_emb": rope}

    return model, ("transformer_blocks",), inputs


def _hunyuan_video() -> tuple[torch.nn.Module, tuple[str, ...], InputFn]:
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, text_embed_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        rope_axes_dim=(4, 6, 6),
    )

    def inputs(g: torch.Generator, batch: int, size: int, t: torch.Tensor) -> dict:
        return {"hidden_states": _randn(g, batch, 4, FRAMES, size, size), "timestep": t,
                "encoder_hidden_states": _text(g, batch), "encoder_attention_mask": _text_mask(batch),
                "pooled_projections": _randn(g, batch, TEXT_DIM), "guidance": torch.full((batch,), 6.0 * 1000)}

    return model, ("transformer_blocks", "single_transformer_blocks"), inputs


def _ltx() -> tuple[torch.nn.Module, tuple[str, ...], InputFn]:
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=4, caption_channels=TEXT_DIM,
    )

    def inputs(g: torch.Generator, batch: int, size: int, t: torch.Tensor) -> dict:
        return {"hidden_states": _randn(g, batch, FRAMES * size * size, 8), "encoder_hidden_states": _text(g, batch),
                "timestep": t, "encoder_attention_mask": _text_mask(batch), "num_frames": FRAMES,
                "height": size, "width": size, "rope_interpolation_scale": (8 / 25, 32, 32)}

    return model, ("transformer_blocks",), inputs


def _sd3() -> tuple[torch.nn.Module, tuple[str, ...], InputFn]:
    model = SD3Transformer2DModel(
        sample_size=8, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=32, pooled_projection_dim=TEXT_DIM, pos_embed_max_size=16,
    )

    def inputs(g: torch.Generator, batch: int, size: int, t: torch.Tensor) -> dict:
        return {"hidden_states": _randn(g, batch, 4, size, size), "encoder_hidden_states": _text(g, batch),
                "pooled_projections": _randn(g, batch, TEXT_DIM), "timestep": t}

    return model, ("transformer_blocks",), inputs


def _sana() -> tuple[torch.nn.Module, tuple[str, ...], InputFn]:
    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=4,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=TEXT_DIM,
        sample_size=8,
    )

    def inputs(g: torch.Generator, batch: int, size: int, t: torch.Tensor) -> dict:
        return {"hidden_states": _randn(g, batch, 4, size, size), "encoder_hidden_states": _text(g, batch),
                "encoder_attention_mask": _text_mask(batch), "timestep": t}

    return model, ("transformer_blocks",), inputs


def _qwen_image() -> tuple[torch.nn.Module, tuple[str, ...], InputFn]:
    model = QwenImageTransformer2DModel(
        in_channels=16, out_channels=4, num_layers=4, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6),
    )

    def inputs(g: torch.Generator, batch: int, size: int, t: torch.Tensor) -> dict:
        return {"hidden_states": _pack(_randn(g, batch, 4, size, size)), "encoder_hidden_states": _text(g, batch),
                "encoder_hidden_states_mask": _text_mask(batch), "timestep": t / 1000,
                "img_shapes": [[(1, size // 2, size // 2)]] * batch}

    return model, ("transformer_blocks",), inputs


_BUILDERS: dict[str, Callable[[], tuple[torch.nn.Module, tuple[str, ...], InputFn]]] = {
    "wan": _wan, "flux": _flux, "pixart": _pixart, "dit": _dit, "cogvideox": _cogvideox,
    "hunyuan_video": _hunyuan_video, "ltx": _ltx, "sd3": _sd3, "sana": _sana, "qwen_image": _qwen_image,
}


def tiny(name: str) -> TinyFamily:
    """The family's tiny transformer: float32, eval mode, weights from torch.manual_seed(0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, block_lists, inputs = _BUILDERS[name]()
    return TinyFamily(name, model.eval(), block_lists, inputs)


def run(family: TinyFamily, batch: int = 1, size: int = 8, timestep: float = 500.0, seed: int = 0) -> torch.Tensor:
    """One forward pass on `family.inputs(...)`; returns the model output (the sample tensor)."""
    with torch.no_grad():
        return family.transformer(**family.inputs(batch, size, timestep, seed), return_dict=False)[0]
