"""RegionE on a Flux editor: a hook on the transformer that picks, per step, the tokens it computes.

The pipeline is untouched. At the partition step and at each refresh the hook returns, for
the unedited tokens, the velocity scaled so that the pipeline's own Euler step carries them to
the next full step's noise level; at the edited-only steps between, it runs the transformer on
the edited tokens alone and returns zero velocity for the rest, so they wait where they are.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from ..models import REGION, Attachment, ContextHook, add_hook, attach, attached, conditioning_key, detach, remove_hook
from ..models import refuse_context_parallel, require_attached, transformer_of
from .attention import RegionAttention, RegionCall, RegionKV
from .config import RegionE
from .partition import edited_tokens, token_similarity

REFERENCE_ID = 1  # the first axis of the image-edited tokens' ids, as FluxKontextPipeline offsets them


@dataclass
class RegionStats:
    calls: int = 0
    full_calls: int = 0
    region_calls: int = 0
    reused_calls: int = 0  # answered by the velocity cache
    generations: int = 0
    global_fallbacks: int = 0  # generations run in full: more than max_edited of the image edited
    tokens_computed: int = 0
    tokens_full: int = 0  # what full compute would have computed
    edited_fraction: list[float] = field(default_factory=list)  # per generation, of the noisy image's tokens

    @property
    def compute_fraction(self) -> float:
        return self.tokens_computed / self.tokens_full if self.tokens_full else 1.0


@dataclass
class Generation:
    timesteps: Any = None  # the scheduler's, identifying the generation
    sigmas: torch.Tensor | None = None  # the scheduler's, on the host
    step: int = -1
    ids_shape: tuple | None = None  # of the image tokens' ids checked, and the noisy image's tokens among them
    tokens: int = 0
    edited: torch.Tensor | None = None  # (B, N) bool; None before the partition
    positions: torch.Tensor | None = None  # (B, E) the edited tokens' indices, padded with repeats
    full: bool = False  # a global edit: every step in full
    kv: dict[str, RegionKV] = field(default_factory=dict)  # per branch
    last: dict[str, torch.Tensor] = field(default_factory=dict)  # per branch, the last edited-only output
    drift: dict[str, float] = field(default_factory=dict)  # per branch, the velocity cache's accumulated factor


class RegionEngine(Attachment):
    part = REGION

    def __init__(self, transformer: FluxTransformer2DModel, config: RegionE, pipe: Any):
        self.transformer, self.config, self.pipe = transformer, config, pipe
        self.call = RegionCall()
        self.counts = RegionStats()
        self.partitions: list[torch.Tensor] = []  # each generation's edited tokens (B, N), for scoring against masks
        self.generation = Generation()
        self.branch_names: dict[tuple, str] = {}
        self.parameters = inspect.signature(type(transformer).forward).parameters
        self.processors = dict(transformer.attn_processors)
        transformer.set_attn_processor({name: RegionAttention(self.call, i, getattr(p, "_attention_backend", None))
                                        for i, (name, p) in enumerate(self.processors.items())})
        self.hook = _RegionHook(self)
        add_hook(transformer, self.hook, REGION)

    def remove(self) -> None:
        remove_hook(self.transformer, REGION)
        self.transformer.set_attn_processor(self.processors)

    def forget(self) -> None:
        self.generation = Generation()
        self.branch_names = {}
        self.call.mode, self.call.kv, self.call.positions = "off", None, None

    def reset(self) -> None:
        self.forget()
        self.counts = RegionStats()
        self.partitions = []

    def stats(self) -> dict:
        held = sum(kv.nbytes() for kv in self.generation.kv.values())
        return {"policy": "RegionE", **asdict(self.counts), "compute_fraction": self.counts.compute_fraction,
                "cache_bytes": held}

    def forward(self, original, args: tuple, kwargs: dict):
        given = {**dict(zip(list(self.parameters)[1:], args)), **kwargs}
        x, img_ids = given["hidden_states"], given["img_ids"]
        text = given["encoder_hidden_states"].shape[1]
        step, num_steps, sigmas = self._place(given["timestep"])
        generation, config = self.generation, self.config
        if generation.ids_shape != img_ids.shape:  # a generation's layout, checked (on the host) at its first call
            generation.tokens, generation.ids_shape = _noisy_tokens(img_ids), img_ids.shape
        tokens = generation.tokens
        phase = "full" if generation.full else config.phase(step, num_steps)
        branch = self._branch(args, kwargs)
        self.counts.calls += 1
        self.counts.tokens_full += text + x.shape[1]
        if phase in ("full", "final"):
            return self._full(original, args, kwargs, text + x.shape[1])
        if phase == "region":
            return self._region(original, given, branch, step, text)
        generation.kv[branch] = self.call.kv = RegionKV()
        self.call.mode = "record"
        try:
            out = self._full(original, args, kwargs, text + x.shape[1])
        finally:
            self.call.mode, self.call.kv = "off", None
        generation.last.pop(branch, None)
        if phase == "partition" and generation.edited is None:
            self._partition(x, out, tokens, float(sigmas[step]), img_ids)
            if generation.full:
                return out
        # unedited tokens: one Euler step to the next full step's noise level, where they wait
        target = config.next_full(step, num_steps)
        scale = float((sigmas[target] - sigmas[step]) / (sigmas[step + 1] - sigmas[step]))
        velocity = _sample(out)
        factor = torch.where(generation.edited, 1.0, scale).to(velocity.dtype)[..., None]
        return _wrap(torch.cat([velocity[:, :tokens] * factor, velocity[:, tokens:]], 1), given)

    def _full(self, original, args, kwargs, tokens: int):
        self.counts.full_calls += 1
        self.counts.tokens_computed += tokens
        return original(*args, **kwargs)

    def _region(self, original, given: dict, branch: str, step: int, text: int):
        generation, config = self.generation, self.config
        x = given["hidden_states"]
        last = generation.last.get(branch)
        if last is not None and config.velocity_threshold > 0:
            drift = generation.drift.get(branch, 1.0) * config.gamma[step]
            if abs(1 - drift) <= config.velocity_threshold:
                generation.drift[branch] = drift
                generation.last[branch] = last = last * config.gamma[step]
                self.counts.reused_calls += 1
                return _wrap(self._scatter(last, x), given)
        generation.drift[branch] = 1.0
        positions = generation.positions
        rows = positions[..., None].expand(-1, -1, x.shape[-1])
        call = {**given, "hidden_states": x.gather(1, rows), "img_ids": given["img_ids"][positions[0]]}
        self.call.mode, self.call.kv = "region", generation.kv[branch]
        self.call.positions = torch.cat([torch.arange(text, device=x.device).expand(len(x), -1), text + positions], 1)
        try:
            out = original(**call)
        finally:
            self.call.mode, self.call.kv, self.call.positions = "off", None, None
        self.counts.region_calls += 1
        self.counts.tokens_computed += text + positions.shape[1]
        generation.last[branch] = velocity = _sample(out)
        return _wrap(self._scatter(velocity, x), given)

    def _scatter(self, velocity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The edited tokens' velocity (B, E, C) in place in a full-size output, zero elsewhere (the rest waits)."""
        full = velocity.new_zeros(x.shape[0], x.shape[1], velocity.shape[-1])
        return full.scatter_(1, self.generation.positions[..., None].expand(-1, -1, velocity.shape[-1]), velocity)

    def _partition(self, x: torch.Tensor, out, tokens: int, sigma: float, img_ids: torch.Tensor) -> None:
        generation, config = self.generation, self.config
        velocity = _sample(out)
        estimate = x[:, :tokens] - sigma * velocity[:, :tokens]  # the one-step clean image, x0 = x_t - sigma v
        reference = x[:, tokens:]
        if reference.shape[1] != tokens:
            raise ValueError(f"RegionE compares the image made with the image edited token by token: {tokens} noisy "
                             f"tokens, {reference.shape[1]} edited-image tokens")
        grid = (int(img_ids[:tokens, 1].max()) + 1, int(img_ids[:tokens, 2].max()) + 1)
        similarity = token_similarity(estimate, reference)
        edited = edited_tokens(similarity, config.threshold, grid, config.clean_mask)
        same_image = (reference[:, None] == reference[None]).flatten(2).all(-1)  # rows editing one image share a mask
        edited = (same_image.float() @ edited.float()) > 0
        fraction = float(edited.float().mean())
        self.counts.edited_fraction.append(fraction)
        self.partitions.append(edited.cpu())
        if fraction > config.max_edited:
            generation.full = True
            self.counts.global_fallbacks += 1
            return
        none = ~edited.any(1)  # a row with nothing edited still computes its least similar token
        edited[none, similarity[none].argmin(1)] = True
        count = int(edited.sum(1).max())
        order = torch.sort(edited.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :count]
        first = order[:, :1].expand(-1, count)
        generation.positions = torch.where(torch.arange(count, device=x.device) < edited.sum(1, keepdim=True), order, first)
        generation.edited = edited

    def _place(self, timestep) -> tuple[int, int, torch.Tensor]:
        """This call's step index, the schedule's length and its sigmas (on the host); a new schedule starts a new
        generation. Past a generation's first step the scheduler's own step index says where it is, so that the
        call waits on no device: the timestep is read (and checked against the schedule) only at its first."""
        scheduler, generation = self.pipe.scheduler, self.generation
        timesteps, index = scheduler.timesteps, getattr(scheduler, "step_index", None)
        if timesteps is None:
            raise RuntimeError("RegionE follows the pipeline's scheduler, which has set no timesteps")
        if index is not None and timesteps is generation.timesteps and generation.step <= index < len(timesteps):
            generation.step = index
            return index, len(timesteps), generation.sigmas
        t = float(timestep.flatten()[0]) * 1000 if isinstance(timestep, torch.Tensor) else float(timestep) * 1000
        step = int((timesteps.float().cpu() - t).abs().argmin())
        if abs(float(timesteps[step]) - t) > 1e-2 * max(1.0, abs(t)):
            raise RuntimeError(f"the transformer was called at timestep {t:g}, which is not on the schedule of the "
                               f"pipeline RegionE was enabled on")
        if timesteps is not generation.timesteps or step < generation.step:
            refuse_context_parallel(self.transformer, "RegionE", "edit on one GPU")  # enabled after RegionE?
            self.forget()
            self.generation = generation = Generation(timesteps=timesteps, sigmas=scheduler.sigmas.cpu())
            self.counts.generations += 1
            self.config.check(len(timesteps))
        generation.step = step
        return step, len(timesteps), generation.sigmas

    def _branch(self, args: tuple, kwargs: dict) -> str:
        context = self.hook.cache_context
        if context is not None:
            return context.name
        key = conditioning_key(self.transformer, args, kwargs)
        return self.branch_names.setdefault(key, f"call{len(self.branch_names)}")


def _noisy_tokens(img_ids: torch.Tensor) -> int:
    """How many of a call's image tokens are the noisy image's (first, before the image edited's)."""
    noisy = img_ids[:, 0] != REFERENCE_ID
    if bool(noisy.all()):
        raise ValueError("RegionE edits with the image being edited in context (its tokens' ids offset on the "
                         "first axis, as FluxKontextPipeline places them): this call has no such tokens")
    tokens = int(noisy.sum())
    if not bool(noisy[:tokens].all()):
        raise ValueError("RegionE expects the noisy image's tokens first, the image edited's after them")
    return tokens


def _sample(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _wrap(sample: torch.Tensor, given: dict):
    """`sample` as the transformer returns its output for this call's `return_dict`."""
    return Transformer2DModelOutput(sample=sample) if given.get("return_dict", True) else (sample,)


class _RegionHook(ContextHook):
    def __init__(self, engine: RegionEngine):
        super().__init__()
        self.engine = engine

    def new_forward(self, module: nn.Module, *args, **kwargs):
        try:
            return self.engine.forward(self.original, args, kwargs)
        except BaseException:
            self.engine.forget()  # a broken generation must not reach the next one
            raise

    def on_reset(self) -> None:
        self.engine.forget()


def enable_region(pipe: Any, config: RegionE) -> RegionEngine:
    """RegionE on an editing pipeline's Flux transformer (reference tokens in context, Euler flow-matching steps)."""
    transformer, pipe = transformer_of(pipe)
    if not isinstance(transformer, FluxTransformer2DModel):
        raise TypeError(f"RegionE edits with a FluxTransformer2DModel (Kontext-style), not {type(transformer).__name__}")
    refuse_context_parallel(transformer, "RegionE", "edit on one GPU")
    if pipe is None or not isinstance(getattr(pipe, "scheduler", None), FlowMatchEulerDiscreteScheduler):
        raise TypeError("RegionE is enabled on the pipeline (it follows its FlowMatchEulerDiscreteScheduler's "
                        "Euler steps), not on a bare transformer")
    if getattr(pipe, "spec", None) is not None and pipe.spec.task != "edit":
        raise ValueError(f"RegionE accelerates an editor, whose input carries the image it edits: {pipe.spec.name} "
                         f"has no reference tokens")
    for part in ("_tempocache_step_cache", REGION):
        if attached(transformer, part) is not None:
            raise RuntimeError(f"a tempocache cache ({type(attached(transformer, part).config).__name__}) is already "
                               f"enabled on this transformer: RegionE carries its own velocity cache and does not stack "
                               f"on a step cache; call tempocache.disable() first")
    engine = RegionEngine(transformer, config, pipe)
    attach(transformer, REGION, engine)
    return engine


def disable_region(pipe: Any) -> None:
    engine = require_attached(pipe, REGION, "RegionE is not enabled on this {name}")
    engine.remove()
    detach(engine.transformer, REGION)
