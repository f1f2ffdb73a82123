"""`tempocache.stream`: frames as they are made, from a chunk-autoregressive model, with a bounded KV cache.

Each chunk of frames is denoised from noise in a few flow-matching steps, its self-attention
reading the keys and values of the frames already made (`tempocache.kv`), and is then
committed to the cache: re-encoded once, clean (Self-Forcing, Ca2-VDM), or from its last
step (StreamDiffusionV2), as the KV config says. Classifier-free guidance runs both branches
as one batch, so the cache holds the frames under the prompt and under the empty prompt.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch

from .kv import FullKV, KVCache, KVConfig, Layout, Recompute, installed
from .kv.quantized import exact_bytes
from .models import STREAM, Attachment, attach, attached, cache_context, detach, refuse_context_parallel
from .reference.models import predict_velocity
from .reference.pipeline import ShapesPipeline

PROMPT_SWITCHES = ("keep", "flush", "recache")


class Stream(Attachment):
    """Iterate for chunks of frames, (chunk frames, H, W, 3) float32 in [0, 1], or (prompts, chunk frames, H, W, 3)
    for a list of prompts streamed side by side (prompt i from seed + i); `send(prompt)` makes the next chunk under a
    new prompt (a list for a list) and returns it, as a generator's `send` does. `close()` (or the end of `frames`)
    ends it."""

    part = STREAM

    def __init__(self, pipe: ShapesPipeline, prompt: str | list[str], frames: int | None, kv: KVConfig, steps: int,
                 guidance: float, seed: int, on_prompt_switch: str):
        spec = pipe.spec
        if not spec.is_streaming:
            raise ValueError(f"{spec.name} is not a streaming model; stream() takes a chunk-autoregressive one (shapes-ar)")
        if not isinstance(kv, KVConfig):
            raise TypeError(f"kv must be a tempocache.kv config (e.g. kv.SlidingWindow(frames=12)), got {type(kv).__name__}")
        chunk = spec.chunk_frames
        kv.check(chunk)
        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < chunk
                                   or frames % chunk):
            raise ValueError(f"frames must be None (endless) or a positive multiple of the chunk size {chunk}, got {frames!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if not guidance >= 1.0:
            raise ValueError(f"guidance must be at least 1.0 (1.0 turns classifier-free guidance off), got {guidance!r}")
        if on_prompt_switch not in PROMPT_SWITCHES:
            raise ValueError(f"on_prompt_switch must be one of {PROMPT_SWITCHES}, got {on_prompt_switch!r}")
        if on_prompt_switch == "recache" and (isinstance(kv, Recompute) or (kv.capacity(chunk) or 0) % chunk):
            raise ValueError(f"on_prompt_switch='recache' re-encodes the held frames a chunk at a time: it needs a cache "
                             f"holding a multiple of {chunk} frames, got {kv}")
        self.guidance = guidance
        self.text = self._encode(pipe, prompt)
        self._check_free(pipe.transformer)
        self.pipe, self.frames, self.kv, self.steps = pipe, frames, kv, steps
        self.on_prompt_switch = on_prompt_switch
        self.batched = not isinstance(prompt, str)
        # noise on the CPU, one generator per prompt: the same stream on any device, alone or beside others
        self.generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompt) if self.batched else 1)]
        patch = pipe.transformer.config.patch_size
        self.layout = Layout(chunk, spec.size // patch[1], spec.size // patch[2])
        config = pipe.transformer.config
        frame = exact_bytes(len(self.text), self.layout.tokens, config.num_attention_heads, config.attention_head_dim,
                            pipe.transformer.dtype.itemsize)
        kv.check_budget(frame * len(pipe.transformer.blocks), chunk)
        self.cache = KVCache(kv, len(pipe.transformer.blocks), pipe.transformer.rope, self.layout)
        self.history: torch.Tensor | None = None  # with Recompute: the newest clean frames, re-run with each chunk
        self.clean: dict[int, torch.Tensor] = {}  # with "recache": each held frame, clean, (B, 3, H, W)
        self.made = 0
        self.peak_kv_bytes = 0
        self._chunks = self._run()

    @staticmethod
    def _check_free(transformer: torch.nn.Module) -> None:
        if attached(transformer, STREAM) is not None:
            raise RuntimeError("a stream is already running on this transformer: close() it first")

    @torch.no_grad()
    def _encode(self, pipe: ShapesPipeline, prompt: str | list[str]) -> torch.Tensor:
        """The text embeddings of [empty prompts, prompts] (only the prompts' without guidance), checked first."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if hasattr(self, "generators") and len(prompts) != len(self.generators):
            raise ValueError(f"this stream makes {len(self.generators)} videos side by side: send as many prompts, "
                             f"got {len(prompts)}")
        ids = pipe.tokenizer(prompts)
        for p in prompts:
            pipe.check_grammar(p)
        text = pipe.encode(ids)
        if self.guidance > 1.0:
            text = torch.cat([pipe.encode(torch.zeros_like(ids)), text])
        return text.to(pipe.transformer.dtype)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._chunks)

    def send(self, prompt: str) -> np.ndarray:
        """Switch to `prompt` (checked before anything changes) and return the next chunk, made under it."""
        text = self._encode(self.pipe, prompt)
        self.text = text
        if self.on_prompt_switch == "flush":
            self.cache.reset()
            self.history = None
        elif self.on_prompt_switch == "recache" and self.clean:
            self._recache()
        return next(self)

    @torch.no_grad()
    def _recache(self) -> None:
        """Re-encode the held frames under the new prompt, a chunk at a time, oldest first (LongLive's KV recache)."""
        frames = [self.clean[f] for f in self.cache.held]
        self.cache.reset()
        self.clean = {}
        transformer, chunk = self.pipe.transformer, self.layout.chunk_frames
        for i in range(0, len(frames), chunk):  # the stream's processors are in place: it has made chunks
            x = torch.stack(frames[i:i + chunk], 2)
            with cache_context(transformer, "commit", step_index=0, num_inference_steps=1):
                self._velocity(x, torch.zeros(()))
            self._commit_clean(x)

    def close(self) -> None:
        self._chunks.close()

    def stats(self) -> dict:
        return {"frames": self.made, "held_frames": len(self.cache.held), "kv_bytes": self.cache.nbytes(),
                "peak_kv_bytes": self.peak_kv_bytes}

    def _run(self) -> Iterator[np.ndarray]:
        transformer = self.pipe.transformer
        self._check_free(transformer)
        attach(transformer, STREAM, self)
        try:
            with contextlib.nullcontext() if isinstance(self.kv, Recompute) else installed(transformer, self.cache):
                while self.frames is None or self.made < self.frames:
                    yield self._chunk()
        finally:
            detach(transformer, STREAM)

    @torch.no_grad()  # per chunk: a grad mode entered around a yield would leak into the caller
    def _chunk(self) -> np.ndarray:
        pipe, layout = self.pipe, self.layout
        transformer, scheduler = pipe.transformer, pipe.scheduler
        noise = torch.cat([torch.randn(1, 3, layout.chunk_frames, pipe.spec.size, pipe.spec.size, generator=g)
                           for g in self.generators])
        x = noise.to(pipe.device, transformer.dtype)
        scheduler.set_timesteps(self.steps, device=pipe.device)
        for i, t in enumerate(scheduler.timesteps):
            with cache_context(transformer, "cfg", step_index=i, num_inference_steps=self.steps):
                v = self._velocity(x, t / 1000)
            x = scheduler.step(v, t, x, return_dict=False)[0]
        if isinstance(self.kv, Recompute):
            kept = x if self.history is None else torch.cat([self.history, x], 2)
            self.history = kept[:, :, kept.shape[2] - self.kv.frames:] if self.kv.frames else None
        else:
            if self.kv.commit == "reencode":
                with cache_context(transformer, "commit", step_index=0, num_inference_steps=1):
                    self._velocity(x, torch.zeros(()))
            self._commit_clean(x)
        self.made += layout.chunk_frames
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.cache.nbytes())
        frames = ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).cpu().numpy()
        return frames if self.batched else frames[0]

    def _commit_clean(self, x: torch.Tensor) -> None:
        """Commit the pending chunk, whose clean frames are x; keep them while held if prompts are recached."""
        first = self.cache.frames_made
        self.cache.commit()
        if self.on_prompt_switch == "recache":
            self.clean.update({first + i: x[:, :, i] for i in range(x.shape[2])})
            held = set(self.cache.held)
            self.clean = {f: frame for f, frame in self.clean.items() if f in held}

    def _velocity(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The guided velocity of chunk x at noise level sigma: both branches in one batch."""
        guided = len(self.text) > len(x)
        frames = x.shape[2]
        sigma = sigma.to(x.device, x.dtype).expand(len(self.text), frames)
        if self.history is not None:  # Recompute: the history's clean frames first, at noise level 0
            x = torch.cat([self.history, x], 2)
            sigma = torch.cat([sigma.new_zeros(len(self.text), self.history.shape[2]), sigma], 1)
        v = predict_velocity(self.pipe.transformer, x.repeat(2, 1, 1, 1, 1) if guided else x, sigma, self.text)
        v = v[:, :, -frames:]
        if not guided:
            return v
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + self.guidance * (v_cond - v_uncond)


def stream(pipe_or_model: ShapesPipeline | str, prompt: str | list[str], frames: int | None = None,
           kv: KVConfig | None = None, steps: int | None = None, guidance: float | None = None, seed: int = 0,
           device: str = "cpu", on_prompt_switch: str = "keep") -> Stream:
    """A stream of chunks of frames for `prompt` (endless when `frames` is None) from a streaming model (a loaded
    pipeline, or a model name), its KV cache as `kv` says (default: `kv.FullKV()`, every frame kept). A list of
    prompts streams them side by side, as one batch.

    on_prompt_switch: what `send(new_prompt)` does with the frames cached under the old prompt: "keep" them
    (the new prompt's chunks continue from them), "flush" them (the stream starts afresh), or "recache" them:
    re-encode the held frames under the new prompt (LongLive), which keeps their clean frames while held.
    Everything is checked before the first chunk is made.
    """
    if isinstance(pipe_or_model, str):
        from .generation import load_pipeline

        pipe_or_model = load_pipeline(pipe_or_model, device)
    refuse_context_parallel(pipe_or_model.transformer, "tempocache.stream", "stream on one GPU")
    spec = pipe_or_model.spec
    return Stream(pipe_or_model, prompt, frames, kv or FullKV(), spec.default_steps if steps is None else steps,
                  spec.default_guidance if guidance is None else guidance, seed, on_prompt_switch)
