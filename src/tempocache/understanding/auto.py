"""Auto (ours): a device KV budget planned into a ReKV memory from a profile of the model's attention.

Inside one device budget, ReKV's knobs trade against each other: the frames held (the sinks and
a window: what new frames are read against, and what answers questions about the recent past)
and the frames retrieved per question (what answers questions about the distant past), all
exact on the device while a question is answered. Auto reads a few training streams with full
KV, asks their questions, and measures where each question's attention goes (per layer, the
softmax mass its queries put on each frame) and which frames ReKV would retrieve (by the
representative keys' scores). Of the ways to split the budget into held and retrieved frames,
it keeps the one whose frames catch the most of that mass (the larger hold on a tie); of 2, 4
and 8 bits for the host frames, the fewest whose attention output over the profile's frames
stays within `tolerance` of exact (host memory is the cheap kind, but not free).

    memory = Auto(memory=64 * 2**20).plan(model)   # a ReKV, to read and print
    watcher = tempocache.watch(model, memory)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import kv
from ..kv.config import check_frames, check_one_budget
from ..kv.quantized import exact_bytes, quantize_frame
from ..reference.shapes_stream import ShapesStream
from .rekv import ReKV, block_scores, retrieve

HOST_BITS = (2, 4, 8)
PROFILE_SEED = 1 << 20  # training streams of their own, apart from those a bench draws


@dataclass(frozen=True)
class Auto(kv.KVConfig):
    """memory: device bytes for a stream's keys and values (held, and retrieved while a question is answered), or
    memory_frames: as many frames' worth; profile_streams, profile_frames, profile_questions: the training streams
    read to profile the model; tolerance: the host frames' largest relative error of attention output."""

    memory: int | None = None
    memory_frames: int | None = None
    profile_streams: int = 2
    profile_frames: int = 256
    profile_questions: int = 8
    tolerance: float = 0.05

    def check(self, chunk_frames: int) -> None:
        super().check(chunk_frames)
        if self.quant is not None:
            raise ValueError("Auto chooses the host frames' bits itself: leave quant None")
        check_one_budget("Auto", self.memory, self.memory_frames)
        for name in ("profile_streams", "profile_frames", "profile_questions"):
            check_frames(name, getattr(self, name))
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance!r}")

    def budget_frames(self, model, chunk_frames: int) -> int:
        """The exact frames the budget holds for this model; at least the sinks, a chunk and one retrieved frame."""
        self.check(chunk_frames)
        text, sinks = model.config.text_config, model.config.stream_sinks
        head_dim = text.hidden_size // text.num_attention_heads
        frame = exact_bytes(1, model.config.image_seq_length, text.num_key_value_heads, head_dim,
                            model.dtype.itemsize) * text.num_hidden_layers
        frames = self.memory_frames if self.memory is None else self.memory // frame
        least = sinks + chunk_frames + 1
        if frames < least:
            raise ValueError(f"a budget of {frames} frames ({frame} bytes each) is below the {sinks} sink frames, a "
                             f"chunk of {chunk_frames} and one retrieved frame: give at least {least * frame} bytes")
        return frames

    @torch.no_grad()
    def plan(self, model, chunk_frames: int = 4) -> ReKV:
        """The ReKV memory this budget is best spent on for `model`, from its profile."""
        from .watcher import watch  # the watcher takes an Auto, and plans it with this

        budget, sinks = self.budget_frames(model, chunk_frames), model.config.stream_sinks
        profile, streams = _Profile(), 0
        for seed in range(PROFILE_SEED, PROFILE_SEED + 16 * self.profile_streams):  # some short streams ask nothing
            stream = ShapesStream(seed, self.profile_frames, "train")
            questions = sorted(stream.questions(self.profile_questions), key=lambda q: q.asked)
            watcher, streams = watch(model, kv.FullKV(), chunk_frames), streams + bool(questions)
            for q in questions:
                watcher.add(stream.render(watcher.frames, q.asked))
                profile.add(watcher, q.text)
            if streams == self.profile_streams:
                break
        else:
            raise RuntimeError(f"Auto's profile streams of {self.profile_frames} frames asked too few questions: "
                               f"give more profile_frames")
        held = profile.best_hold(budget, sinks, sinks + chunk_frames)
        bits = next((b for b in HOST_BITS if profile.host_error(b) <= self.tolerance), None)
        return ReKV(frames=held, sink_frames=sinks, top_k=budget - held, quant=kv.KVQuant(bits=bits) if bits else None)


class _Profile:
    """Per profiled question and layer: the attention mass on each frame read, the representative keys' scores, and
    the frames' keys and values with the question's queries (for the host bits' error)."""

    def __init__(self):
        self.questions: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per question, per layer (mass, scores)
        self.outputs: list[tuple] = []  # (queries, keys, values, frames) per question and layer

    def add(self, watcher, question: str) -> None:
        ids = torch.tensor(watcher.tokenizer.encode(question), device=watcher.model.device)
        queries: list[torch.Tensor] = []
        frames = list(watcher.held)
        watcher._question(ids, [frames] * len(watcher.device_kv), capture=queries)
        layers = []
        for layer, q in enumerate(queries):  # q: (heads, tokens, head_dim), rotated
            keys = torch.cat([watcher.device_kv[layer][f][0] for f in frames], 2)[0].float()  # (kv_heads, L, dim)
            values = torch.cat([watcher.device_kv[layer][f][1] for f in frames], 2)[0].float()
            weights = _attention(q.float(), keys)  # (heads, tokens, L)
            mass = weights.mean((0, 1)).unflatten(0, (len(frames), -1)).sum(1)  # (frames,)
            representatives = keys.unflatten(1, (len(frames), -1)).mean(2).transpose(0, 1)  # (frames, kv_heads, dim)
            layers.append((mass, block_scores(q, representatives)))
            self.outputs.append((q.float(), keys, values, len(frames)))
        self.questions.append(layers)

    def best_hold(self, budget: int, sinks: int, least: int) -> int:
        """The frames to hold of a budget of `budget` (the rest retrieved) whose frames catch the most attention mass:
        the larger hold on a tie."""
        return max(range(least, budget), key=lambda held: (round(self.recall(held, budget - held, sinks), 6), held))

    def recall(self, held: int, top_k: int, sinks: int) -> float:
        """The mean attention mass on the frames a ReKV of `held` frames and `top_k` retrieved would attend to."""
        total = 0.0
        for layers in self.questions:
            for mass, scores in layers:
                frames = len(mass)
                kept = set(range(min(sinks, frames))) | set(range(max(sinks, frames - (held - sinks)), frames))
                older = [f for f in range(frames) if f not in kept]
                if older:
                    kept |= set(retrieve(scores[older], older, top_k))
                total += float(mass[sorted(kept)].sum())
        return total / sum(len(layers) for layers in self.questions)

    def host_error(self, bits: int) -> float:
        """The largest relative error, over the profile, of attention output with every frame in `bits` bits (each
        frame quantized on its own, as ReKV stores it on the host)."""
        worst = 0.0
        for q, keys, values, frames in self.outputs:
            pairs = [_round_trip(k, v, bits) for k, v in zip(keys.chunk(frames, 1), values.chunk(frames, 1))]
            approx_keys, approx_values = (torch.cat(t, 1) for t in zip(*pairs))
            exact = _attention(q, keys) @ _grouped(values, q.shape[0])
            approx = _attention(q, approx_keys) @ _grouped(approx_values, q.shape[0])
            worst = max(worst, float((approx - exact).norm() / exact.norm().clamp_min(1e-12)))
        return worst


def _round_trip(keys: torch.Tensor, values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame's keys and values (kv_heads, tokens, dim) stored in `bits` bits and read back."""
    frame = quantize_frame(keys.transpose(0, 1)[None], values.transpose(0, 1)[None], bits)
    return frame.keys(torch.float32)[0].transpose(0, 1), frame.values(torch.float32)[0].transpose(0, 1)


def _grouped(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(kv_heads, L, dim) repeated onto the query heads that share them: (heads, L, dim)."""
    return t.repeat_interleave(heads // t.shape[0], 0)


def _attention(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(heads, tokens, L) softmax weights of queries (heads, tokens, dim) over keys (kv_heads, L, dim)."""
    return torch.softmax(q @ _grouped(keys, q.shape[0]).transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
