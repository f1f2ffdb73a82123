"""`ShapesPipeline`: a diffusers pipeline around a shipped reference model.

Flow-matching Euler sampling with diffusers' `FlowMatchEulerDiscreteScheduler` and
classifier-free guidance. As in diffusers' Wan and Flux pipelines, the conditional
and unconditional branches are separate transformer calls, each inside
`cache_context("cond" / "uncond", step_index=..., num_inference_steps=...)`, so that
cache hooks (diffusers', cache-dit's, ours) can keep their state per branch; with
`batch_cfg=True` they are one call on the batch [uncond, cond] (as in diffusers'
CogVideoX pipeline), which FasterCache and Pyramid Attention Broadcast expect.
An editing model (`shapes-edit`) takes the image it edits as `image`, its tokens in context after
the noisy ones (as diffusers' `FluxKontextPipeline` places them), and an instruction as the prompt;
its unconditional branch keeps the image and drops the instruction.
Every argument is checked before any compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from . import edits, shapesworld
from .models import ReferenceSpec, edit_velocity, get_spec, load_weights, make_scheduler, make_tokenizer, predict_velocity, spec_for

MAX_FRAMES = 64
MAX_SIZE = 128


@dataclass
class ShapesOutput:
    frames: np.ndarray  # (B, T, H, W, 3) float32 in [0, 1]; T = 1 for images
    prompts: list[str]


class ShapesPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer: torch.nn.Module, text_encoder: torch.nn.Module, scheduler: FlowMatchEulerDiscreteScheduler,
                 spec: ReferenceSpec | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)
        self.spec = spec or spec_for(transformer)  # an editor shares its generator's class: give its spec
        self.tokenizer = make_tokenizer(self.spec)

    @classmethod
    def from_reference(cls, name: str = "shapes-t2v", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "ShapesPipeline":
        spec = get_spec(name)
        transformer, text_encoder = load_weights(spec.directory, spec, dtype)
        return cls(transformer, text_encoder, make_scheduler(), spec).to(device)

    def check_inputs(self, prompts: list[str], steps: int, guidance: float, num_frames: int, height: int, width: int,
                     image: torch.Tensor | None = None) -> torch.Tensor:
        """Validate everything; return the token ids of the prompts."""
        if not prompts:
            raise ValueError("no prompt given")
        self.check_image(image, len(prompts), height, width)
        if self.spec.task == "edit":  # before the tokenizer, which would list the captions' words too
            for prompt in prompts:
                edits.check_instruction(prompt)
        ids = self.tokenizer(prompts)
        for prompt in prompts:
            self.check_grammar(prompt)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if not guidance >= 1.0:
            raise ValueError(f"guidance must be at least 1.0 (1.0 turns classifier-free guidance off), got {guidance!r}")
        if self.spec.is_streaming:
            chunk = self.spec.chunk_frames
            if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < chunk or num_frames % chunk:
                raise ValueError(f"{self.spec.name} makes frames {chunk} at a time: num_frames must be a positive "
                                 f"multiple of {chunk}, got {num_frames!r}")
            if (height, width) != (self.spec.size, self.spec.size):
                raise ValueError(f"{self.spec.name} streams {self.spec.size}x{self.spec.size} frames, got {height}x{width}")
        elif self.spec.is_video:
            if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= MAX_FRAMES:
                raise ValueError(f"{self.spec.name} makes 1 to {MAX_FRAMES} frames, got num_frames={num_frames!r}")
        elif num_frames != 1:
            raise ValueError(f"{self.spec.name} is a text-to-image model: num_frames must be 1, got {num_frames!r}")
        for label, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value % 2 or not 2 <= value <= MAX_SIZE:
                raise ValueError(f"{label} must be an even number of pixels from 2 to {MAX_SIZE}, got {value!r}")
        return ids

    def check_image(self, image: torch.Tensor | None, count: int, height: int, width: int) -> None:
        """An editor needs the images it edits, (count, 3, height, width) in [0, 1]; a generator takes none."""
        if self.spec.task != "edit":
            if image is not None:
                raise ValueError(f"{self.spec.name} makes images from captions alone: it takes no image to edit")
            return
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"{self.spec.name} edits an image: pass image, a (B, 3, H, W) tensor in [0, 1], "
                             f"got {type(image).__name__}")
        if tuple(image.shape) != (count, 3, height, width):
            raise ValueError(f"image must be shaped ({count}, 3, {height}, {width}) (one RGB image per instruction), "
                             f"got {tuple(image.shape)}")
        if not image.is_floating_point() or not bool(((image >= 0) & (image <= 1)).all()):
            raise ValueError("image must hold floats in [0, 1]")

    def check_grammar(self, prompt: str) -> None:
        """Refuse a caption outside the grammar the model was trained on, showing the nearest one inside it."""
        if self.spec.task == "edit":
            edits.check_instruction(prompt)
            return
        scene = shapesworld.parse_caption(prompt)  # names what is wrong with a caption that does not parse
        if self.spec.is_streaming and any(o.motion not in shapesworld.STREAM_MOTIONS for o in scene.objects):
            raise ValueError(f"caption {prompt!r}: {self.spec.name} streams endless clips, where nothing can grow for "
                             f"ever; its motions are {', '.join(shapesworld.MOTIONS[m] for m in shapesworld.STREAM_MOTIONS)}")
        canonical = scene.caption(self.spec.is_video)
        if " ".join(prompt.lower().split()) != canonical:
            kind = ("a video model: give every shape a motion" if self.spec.is_video
                    else "a text-to-image model: shapes have no motion")
            raise ValueError(f"caption {prompt!r} is outside {self.spec.name}'s grammar ({kind}); e.g. {canonical!r}")

    @property
    def current_timestep(self) -> torch.Tensor | None:
        """The timestep being denoised (None between generations), for hooks that take a timestep callback."""
        return getattr(self, "_current_timestep", None)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids.to(self.device))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | list[int] = 0,
        batch_cfg: bool = False,
        image: torch.Tensor | None = None,
    ) -> ShapesOutput:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steps = self.spec.default_steps if num_inference_steps is None else num_inference_steps
        guidance = self.spec.default_guidance if guidance_scale is None else guidance_scale
        frames = self.spec.num_frames if num_frames is None else num_frames
        height = self.spec.size if height is None else height
        width = self.spec.size if width is None else width
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        ids = self.check_inputs(prompts, steps, guidance, frames, height, width, image)
        if self.spec.is_streaming:  # chunk by chunk, every frame kept: what `tempocache.stream` makes with FullKV
            from ..streaming import stream

            clips = [np.concatenate(list(stream(self, p, frames, steps=steps, guidance=guidance, seed=s)))
                     for p, s in zip(prompts, seeds)]
            return ShapesOutput(np.stack(clips), prompts)

        dtype = self.transformer.dtype
        use_cfg = guidance > 1.0
        text = self.encode(ids).to(dtype)
        empty = self.encode(torch.zeros_like(ids)).to(dtype) if use_cfg else None
        # Noise is drawn on the CPU, one generator per sample: same seed, same clip on any device.
        noise = [torch.randn(3, frames, height, width, generator=torch.Generator().manual_seed(s)) for s in seeds]
        x = torch.stack(noise).to(self.device, dtype)
        reference = None if image is None else (image.to(self.device, dtype) * 2 - 1)[:, :, None]  # shaped as x

        def velocity(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            if reference is None:
                return predict_velocity(self.transformer, x, sigma, text)
            return edit_velocity(self.transformer, x, reference.repeat(len(x) // len(reference), 1, 1, 1, 1), sigma, text)

        self.scheduler.set_timesteps(steps, device=self.device)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            self._current_timestep = t
            sigma = (t / 1000).expand(len(prompts)).to(dtype)
            where = dict(step_index=i, num_inference_steps=steps, timestep=t, sigma=float(sigma[0]))
            if use_cfg and batch_cfg:
                with self.transformer.cache_context("cfg", **where):
                    v_uncond, v = velocity(x.repeat(2, 1, 1, 1, 1), sigma.repeat(2), torch.cat([empty, text])).chunk(2)
            else:
                with self.transformer.cache_context("cond", **where):
                    v = velocity(x, sigma, text)
                if use_cfg:
                    with self.transformer.cache_context("uncond", **where):
                        v_uncond = velocity(x, sigma, empty)
            if use_cfg:
                v = v_uncond + guidance * (v - v_uncond)
            x = self.scheduler.step(v, t, x, return_dict=False)[0]
        self._current_timestep = None
        self.maybe_free_model_hooks()  # also resets stateful cache hooks (diffusers', cache-dit's) for the next generation
        clips = ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)
        return ShapesOutput(clips.cpu().numpy(), prompts)
