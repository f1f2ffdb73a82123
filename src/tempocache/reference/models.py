"""The shipped reference models: their architectures, how each is driven, where the weights live.

All are plain diffusers model classes working in pixel space on ShapesWorld:
- `shapes-t2v`: `WanTransformer3DModel`, patch 1x2x2, text-to-video;
- `shapes-t2i`: `FluxTransformer2DModel` (MMDiT), 2x2-packed pixels, text-to-image;
- `shapes-ar` (in training, not shipped yet): `SkyReelsV2Transformer3DModel`, the same
  architecture as shapes-t2v with a noise level per frame and block-causal attention over
  chunks of frames (diffusion forcing), fine-tuned from shapes-t2v to stream endless clips;
- `shapes-edit` (in training, not shipped yet): shapes-t2i's architecture with the image it edits
  in context (`edit_velocity`), fine-tuned from shapes-t2i on ShapesWorld edits (`edits.py`).
Each is trained with flow matching: x_s = (1 - s) x_0 + s noise, the model predicting
the velocity noise - x_0 at noise level s, exactly what diffusers'
`FlowMatchEulerDiscreteScheduler` integrates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SkyReelsV2Transformer3DModel,
    WanTransformer3DModel,
)
from safetensors.torch import load_file, save_file

from . import edits, shapesworld
from .text import Tokenizer, WordEncoder

WEIGHTS_DIR = Path(__file__).parent / "weights"
MAX_CAPTION_WORDS = 20


@dataclass(frozen=True)
class ReferenceSpec:
    name: str
    family: str  # "wan" (video), "flux" (image) or "skyreels" (streaming video)
    transformer: dict
    default_steps: int  # per chunk for streaming models
    default_guidance: float
    num_frames: int  # the default; "flux" models make single frames; streaming models train on clips this long
    size: int
    chunk_frames: int = 0  # streaming models: frames made at a time
    init_from: str = ""  # a training run from scratch starts from this model's weights
    task: str = "generate"  # or "edit": an image made from an instruction and the image it edits

    @property
    def is_video(self) -> bool:
        return self.family in ("wan", "skyreels")

    @property
    def is_streaming(self) -> bool:
        return self.family == "skyreels"

    @property
    def directory(self) -> Path:
        return WEIGHTS_DIR / self.name


SPECS = {
    "shapes-t2v": ReferenceSpec(
        name="shapes-t2v",
        family="wan",
        transformer=dict(
            patch_size=(1, 2, 2),
            num_attention_heads=4,
            attention_head_dim=64,
            in_channels=3,
            out_channels=3,
            text_dim=128,
            freq_dim=128,
            ffn_dim=1024,
            num_layers=8,
            rope_max_seq_len=64,
        ),
        default_steps=20,
        default_guidance=2.0,
        num_frames=shapesworld.DEFAULT_FRAMES,
        size=shapesworld.DEFAULT_SIZE,
    ),
    "shapes-t2i": ReferenceSpec(
        name="shapes-t2i",
        family="flux",
        transformer=dict(
            patch_size=1,
            in_channels=12,
            num_layers=3,
            num_single_layers=6,
            attention_head_dim=64,
            num_attention_heads=4,
            joint_attention_dim=128,
            pooled_projection_dim=128,
            axes_dims_rope=(16, 24, 24),
        ),
        default_steps=20,
        default_guidance=2.0,
        num_frames=1,
        size=shapesworld.DEFAULT_SIZE,
    ),
}
SPECS["shapes-edit"] = ReferenceSpec(
    name="shapes-edit",
    family="flux",
    transformer=SPECS["shapes-t2i"].transformer,
    default_steps=20,
    default_guidance=2.0,
    num_frames=1,
    size=shapesworld.DEFAULT_SIZE,
    init_from="shapes-t2i",
    task="edit",
)
# Models being trained: trainable by name, shipped (moved to SPECS) once they meet their bars.
IN_TRAINING = {
    "shapes-ar": ReferenceSpec(
        name="shapes-ar",
        family="skyreels",
        transformer={**SPECS["shapes-t2v"].transformer, "num_frame_per_block": 4},
        default_steps=20,
        default_guidance=2.0,
        num_frames=32,
        size=shapesworld.DEFAULT_SIZE,
        chunk_frames=4,
        init_from="shapes-t2v",
    ),
}
TEXT_DIM = 128
CLASSES = {"wan": WanTransformer3DModel, "flux": FluxTransformer2DModel, "skyreels": SkyReelsV2Transformer3DModel}


def get_spec(name: str) -> ReferenceSpec:
    """A shipped model's spec, or one in training (for `train-reference`)."""
    if name not in SPECS and name not in IN_TRAINING:
        raise ValueError(f"unknown model {name!r}; the shipped models are: {', '.join(SPECS)}")
    return SPECS.get(name) or IN_TRAINING[name]


def spec_for(transformer: torch.nn.Module) -> ReferenceSpec:
    """The spec whose architecture family matches `transformer`."""
    family = next((f for f, cls in CLASSES.items() if type(transformer) is cls), None)
    if family is None:
        raise TypeError(f"reference models are {', '.join(c.__name__ for c in CLASSES.values())}, "
                        f"not {type(transformer).__name__}")
    return next(s for s in [*SPECS.values(), *IN_TRAINING.values()] if s.family == family)


def make_tokenizer(spec: ReferenceSpec | None = None) -> Tokenizer:
    """The captions' words; for an editor, followed by the words only instructions use (so that a caption's words
    keep their ids, and an editor's text encoder can start from a generator's)."""
    words = shapesworld.vocabulary()
    if spec is not None and spec.task == "edit":
        words = (*words, *sorted(set(edits.vocabulary()) - set(words)))
    return Tokenizer(words, MAX_CAPTION_WORDS)


def build_untrained(spec: ReferenceSpec) -> tuple[torch.nn.Module, WordEncoder]:
    """Fresh (randomly initialised) transformer and text encoder for `spec`."""
    text_encoder = WordEncoder(len(make_tokenizer(spec).words), MAX_CAPTION_WORDS, TEXT_DIM)
    return CLASSES[spec.family](**spec.transformer), text_encoder


def load_grown(text_encoder: WordEncoder, trained: WordEncoder) -> None:
    """`trained`'s weights into `text_encoder`, whose vocabulary extends trained's: the words they share keep their
    embeddings, the new ones keep theirs."""
    state = trained.state_dict()
    embed = text_encoder.embed.weight.detach().clone()
    embed[:len(state["embed.weight"])] = state["embed.weight"]
    text_encoder.load_state_dict({**state, "embed.weight": embed})


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def predict_velocity(transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Velocity for pixels x (B, 3, T, H, W) in [-1, 1] at noise level sigma (B,) in [0, 1], or (B, T) per frame
    for a streaming model."""
    if isinstance(transformer, SkyReelsV2Transformer3DModel):
        per_frame = sigma if sigma.dim() == 2 else sigma[:, None].expand(-1, x.shape[2])
        return transformer(hidden_states=x, timestep=per_frame * 1000, encoder_hidden_states=text,
                           enable_diffusion_forcing=True, return_dict=False)[0]
    if isinstance(transformer, WanTransformer3DModel):
        return transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[0]
    if isinstance(transformer, FluxTransformer2DModel):
        return _flux_velocity(transformer, x, sigma, text)
    raise TypeError(f"reference models are Wan, SkyReels-V2 or Flux transformers, not {type(transformer).__name__}")


def _flux_velocity(transformer: FluxTransformer2DModel, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                   reference: torch.Tensor | None = None) -> torch.Tensor:
    """With `reference` (pixels shaped as x), its tokens follow x's, their ids offset on the first axis, as
    diffusers' `FluxKontextPipeline` places the image it edits; the velocity is x's tokens' only."""
    tokens, img_ids = _pack(x, 0)
    if reference is not None:
        reference_tokens, reference_ids = _pack(reference, 1)
        tokens, img_ids = torch.cat([tokens, reference_tokens], 1), torch.cat([img_ids, reference_ids])
    txt_ids = torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype)
    out = transformer(
        hidden_states=tokens,
        encoder_hidden_states=text,
        pooled_projections=text.mean(1),
        timestep=sigma,  # Flux multiplies by 1000 itself
        img_ids=img_ids,
        txt_ids=txt_ids,
        return_dict=False,
    )[0]
    b, c, t, h, w = x.shape
    out = out[:, :t * (h // 2) * (w // 2)]
    return out.reshape(b, t, h // 2, w // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, t, h, w)


def _pack(x: torch.Tensor, first_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each 2x2 pixel patch of x (B, C, T, H, W) as one token, as FluxPipeline packs latents: (tokens (B, N, 4C), their
    ids (N, 3), the first axis `first_id`)."""
    b, c, t, h, w = x.shape
    tokens = x.reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, t * (h // 2) * (w // 2), c * 4)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.full_like(rows, first_id), rows, cols], -1).reshape(-1, 3).to(x.device, x.dtype)
    return tokens, ids


def edit_velocity(transformer: FluxTransformer2DModel, x: torch.Tensor, reference: torch.Tensor, sigma: torch.Tensor,
                  text: torch.Tensor) -> torch.Tensor:
    """Velocity for the edited image's pixels x (B, 3, 1, H, W) in [-1, 1] at noise level sigma (B,), the image being
    edited, `reference` (same shape, clean), in context (Kontext-style, its tokens after x's)."""
    if not isinstance(transformer, FluxTransformer2DModel):
        raise TypeError(f"editing takes the reference image's tokens in context: it needs a FluxTransformer2DModel, "
                        f"not {type(transformer).__name__}")
    if reference.shape != x.shape:
        raise ValueError(f"the reference image must be shaped as the image made, {tuple(x.shape)}, "
                         f"got {tuple(reference.shape)}")
    return _flux_velocity(transformer, x, sigma, text, reference)


def save_weights(directory: Path, transformer: torch.nn.Module, text_encoder: WordEncoder) -> None:
    """Write fp16 safetensors in diffusers' layout (transformer shards of at most 15 MB)."""
    directory.mkdir(parents=True, exist_ok=True)
    half = type(transformer).from_config(transformer.config).to(torch.float16)
    half.load_state_dict(transformer.state_dict())
    half.save_pretrained(directory / "transformer", safe_serialization=True, max_shard_size="15MB")
    (directory / "text_encoder").mkdir(exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in text_encoder.state_dict().items()}
    save_file(state, directory / "text_encoder" / "model.safetensors")
    (directory / "text_encoder" / "config.json").write_text(json.dumps(text_encoder.config, indent=2))
    make_scheduler().save_config(directory / "scheduler")


def load_weights(directory: Path, spec: ReferenceSpec, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, WordEncoder]:
    """Load a model saved by `save_weights`, from local files only."""
    if not (directory / "transformer" / "config.json").exists():
        raise FileNotFoundError(f"no weights for {spec.name} in {directory}; train them with `tempocache train-reference`")
    transformer = CLASSES[spec.family].from_pretrained(directory / "transformer", torch_dtype=dtype, local_files_only=True)
    config = json.loads((directory / "text_encoder" / "config.json").read_text())
    text_encoder = WordEncoder(**config)
    text_encoder.load_state_dict(load_file(directory / "text_encoder" / "model.safetensors"))
    return transformer.eval(), text_encoder.to(dtype).eval()
