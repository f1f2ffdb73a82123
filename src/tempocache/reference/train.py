"""Train a reference model with flow matching on ShapesWorld (`tempocache train-reference`).

Runs for a wall-clock budget and can resume: the shipped fp16 weights plus
`training.json` (step count, time, loss history) are enough to continue on a fresh
machine; a full checkpoint (fp32 weights, EMA, optimizer) is also kept in
`--checkpoint-dir` for a faster, exact resume on the same machine.
The EMA weights are the ones saved for shipping.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import edits, shapesworld
from .models import (build_untrained, edit_velocity, get_spec, load_grown, load_weights, make_tokenizer,
                     predict_velocity, save_weights)

CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999
WARMUP_STEPS = 500
CLEAN_HISTORY = 0.5  # streaming models: share of clips whose first chunks are clean, as the KV cache gives them


def flow_matching_loss(transformer, text_encoder, clips: torch.Tensor, ids: torch.Tensor,
                       reference: torch.Tensor | None = None) -> torch.Tensor:
    """`reference`: for an editor, the image each clip edits, clean in context."""
    noise = torch.randn_like(clips)
    sigma = torch.sigmoid(torch.randn(len(clips), device=clips.device))  # logit-normal noise levels
    s = sigma.view(-1, 1, 1, 1, 1)
    noisy, text = (1 - s) * clips + s * noise, text_encoder(ids)
    velocity = (predict_velocity(transformer, noisy, sigma, text) if reference is None else
                edit_velocity(transformer, noisy, reference, sigma, text))
    return torch.nn.functional.mse_loss(velocity.float(), (noise - clips).float())


def diffusion_forcing_loss(transformer, text_encoder, clips: torch.Tensor, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Flow matching with a noise level per chunk (Diffusion Forcing, Chen et al. 2024) under the model's block-causal
    attention. In CLEAN_HISTORY of the clips the chunks before a random one are clean and not scored: what a chunk
    sees when it is made after them from the cache."""
    b, t = clips.shape[0], clips.shape[2]
    chunks = t // chunk
    noise = torch.randn_like(clips)
    sigma = torch.sigmoid(torch.randn(b, chunks, device=clips.device))  # logit-normal, per chunk
    first_made = torch.randint(1, chunks, (b, 1), device=clips.device)
    clean = (torch.rand(b, 1, device=clips.device) < CLEAN_HISTORY) & (torch.arange(chunks, device=clips.device) < first_made)
    per_frame = torch.where(clean, 0.0, sigma).repeat_interleave(chunk, 1)  # (B, T)
    s = per_frame[:, None, :, None, None]
    velocity = predict_velocity(transformer, (1 - s) * clips + s * noise, per_frame, text_encoder(ids))
    error = (velocity.float() - (noise - clips).float()).pow(2).mean(dim=(1, 3, 4))  # (B, T)
    scored = (~clean).repeat_interleave(chunk, 1).float()
    return (error * scored).sum() / scored.sum()


def train_reference(
    model: str,
    out_dir: Path,
    minutes: float,
    batch_size: int = 32,
    lr: float = 4e-4,
    device: str = "cuda",
    resume_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    seed: int = 0,
    workers: int = 6,
    log_every: int = 100,
    compile: bool = False,
    frames: tuple[int, ...] | None = None,
) -> dict:
    """Train (or resume training) `model` for `minutes`; `frames`: the clip lengths a video model trains on, one
    per batch, drawn uniformly (default: the model's own length)."""
    spec = get_spec(model)
    frames = tuple(frames or (spec.num_frames,)) if spec.is_video else (1,)
    torch.manual_seed(seed)
    transformer, text_encoder = build_untrained(spec)
    state = {"model": model, "steps": 0, "seconds": 0.0, "batch_size": batch_size, "lr": lr, "seed": seed, "losses": [], "sessions": []}
    checkpoint = checkpoint_dir / f"{model}.pt" if checkpoint_dir else None
    full = torch.load(checkpoint, map_location="cpu") if checkpoint and checkpoint.exists() else None
    if full:
        transformer.load_state_dict(full["transformer"])
        text_encoder.load_state_dict(full["text_encoder"])
        state = full["state"]
    elif resume_dir and (resume_dir / "training.json").exists():
        transformer, text_encoder = load_weights(resume_dir, spec)
        state = json.loads((resume_dir / "training.json").read_text())
    elif spec.init_from:
        init_transformer, init_text_encoder = load_weights(get_spec(spec.init_from).directory, get_spec(spec.init_from))
        transformer.load_state_dict(init_transformer.state_dict())
        load_grown(text_encoder, init_text_encoder)  # an editor's vocabulary extends the captions'
        state["init_from"] = spec.init_from
    transformer.to(device).train()
    text_encoder.to(device).train()
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in (transformer, text_encoder)]
    if full:
        ema[0].load_state_dict(full["ema_transformer"])
        ema[1].load_state_dict(full["ema_text_encoder"])
    params = [*transformer.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    if full:
        optimizer.load_state_dict(full["optimizer"])
    ema_params = [*ema[0].parameters(), *ema[1].parameters()]
    warmup_from = 0 if full else state["steps"]  # a fresh optimizer warms up again, even on trained weights

    stream_seed = seed * 1_000_003 + state["steps"]
    if spec.task == "edit":
        stream = edits.EditBatchStream(batch_size, "train", seed=stream_seed, size=spec.size)
    else:
        stream = shapesworld.BatchStream(batch_size, "train", frames, spec.is_video, seed=stream_seed,
                                         endless=spec.is_streaming)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    tokenizer = make_tokenizer(spec)
    start, running, first_step = time.time(), [], state["steps"]
    print(f"training {model}: {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M transformer parameters, "
          f"from step {first_step}, for {minutes} min on {device}", flush=True)
    # bf16 for the video model's long sequences; the image model trains in fp32 (TF32 matmuls): in bf16 its
    # backward failed inside cuBLAS on an H100 (CUBLAS_STATUS_EXECUTION_FAILED, 2026-11-22).
    torch.backends.cuda.matmul.allow_tf32 = True
    use_bf16 = device.startswith("cuda") and spec.is_video
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    eager_loss = (functools.partial(diffusion_forcing_loss, chunk=spec.chunk_frames) if spec.is_streaming
                  else flow_matching_loss)
    loss_fn = torch.compile(eager_loss) if compile else eager_loss
    for batch in loader:
        step = state["steps"]
        clips, context, text = _inputs(batch, device, spec.is_video)
        ids = tokenizer(text)
        ids[torch.rand(len(ids)) < CAPTION_DROPOUT] = 0  # the empty caption, for classifier-free guidance
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step - warmup_from + 1) / WARMUP_STEPS)
        with autocast:
            try:
                loss = loss_fn(transformer, text_encoder, clips, ids.to(device), **context)
            except Exception as error:  # a compiler failure must not cost the run: go on eagerly
                if loss_fn is eager_loss:
                    raise
                print(f"torch.compile failed ({type(error).__name__}: {error}); training eagerly", flush=True)
                loss_fn = eager_loss
                loss = loss_fn(transformer, text_encoder, clips, ids.to(device), **context)
        update(loss, optimizer, params, ema_params, step)
        if step_done(state, running, loss, start, first_step, log_every, minutes):
            break
    state["batch_size"], state["lr"] = batch_size, lr  # of the latest session; each session records its own
    record_session(state, start, first_step, device, batch_size=batch_size, lr=lr, frames=list(frames))
    save_weights(out_dir, ema[0], ema[1])
    (out_dir / "training.json").write_text(json.dumps(state, indent=1))
    if checkpoint:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"transformer": transformer.state_dict(), "text_encoder": text_encoder.state_dict(),
                    "ema_transformer": ema[0].state_dict(), "ema_text_encoder": ema[1].state_dict(),
                    "optimizer": optimizer.state_dict(), "state": state}, checkpoint)
    return state


def update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list, ema_params: list, step: int) -> None:
    """One optimizer step on `loss` (every optimized gradient clipped to norm 1), then the EMA weights `ema_params`
    toward `params`."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
    optimizer.step()
    torch._foreach_lerp_(ema_params, params, 1 - min(EMA_DECAY, (1 + step) / (10 + step)))


def record_session(state: dict, start: float, first_step: int, device: str, **settings) -> None:
    """Add this run's seconds to the training state and its record (device, steps, seconds, `settings`)."""
    elapsed = time.time() - start
    state["seconds"] += elapsed
    state["sessions"].append({"device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
                              "steps": state["steps"] - first_step, "seconds": round(elapsed, 1), **settings})


def step_done(state: dict, running: list[torch.Tensor], loss: torch.Tensor, start: float, first_step: int,
              log_every: int, minutes: float) -> bool:
    """Count a training step and its loss, log the mean loss every `log_every` steps; whether `minutes` are up."""
    state["steps"] += 1
    running.append(loss.detach())
    if state["steps"] % log_every == 0:
        log_mean_loss(state, running, start, first_step)
    return time.time() - start > minutes * 60


def log_mean_loss(state: dict, running: list[torch.Tensor], start: float, first_step: int) -> None:
    """Record and print the mean of the losses since the last time (emptying `running`); stop on a non-finite one."""
    mean = torch.stack(running).mean().item()
    running.clear()
    state["losses"].append([state["steps"], mean])
    elapsed = time.time() - start
    print(f"step {state['steps']} loss {mean:.4f} {elapsed / (state['steps'] - first_step) * 1000:.0f} ms/step", flush=True)
    if not math.isfinite(mean):
        raise RuntimeError(f"loss is {mean} at step {state['steps']}")


def _inputs(batch, device: str, with_motion: bool) -> tuple[torch.Tensor, dict, list[str]]:
    """A batch's pixels in [-1, 1], (B, 3, T, H, W), what its loss also takes (an editor's reference images), and its
    captions or instructions."""
    if isinstance(batch, edits.EditBatch):
        targets, sources = (x[:, :, None].to(device, non_blocking=True) * 2 - 1 for x in (batch.targets, batch.sources))
        return targets, {"reference": sources}, batch.instructions()
    clips = batch.clips.permute(0, 2, 1, 3, 4).to(device, non_blocking=True) * 2 - 1
    return clips, {}, batch.captions(with_motion)
