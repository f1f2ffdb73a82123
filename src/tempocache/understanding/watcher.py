"""`tempocache.watch`: a stream read frame by frame into a video-language model's KV cache, questions asked at any
time, memory bounded by a `tempocache.kv` policy.

The model reads each frame as it was trained to (`reference/vqa.py`): a frame's tokens attend to the
sinks and the window before it, among the frames the memory holds (the others are not read at all).
What the memory holds is the policy's: `kv.FullKV()` every frame (the trained oracle),
`kv.Sinks(frames, sink_frames)` or `kv.SlidingWindow(frames)` the frames it keeps (StreamingLLM: the
rest are dropped), `ReKV(...)` the same on the device and every older frame on the host (in 8, 4 or
2 bits with `quant=kv.KVQuant(bits=...)`), retrieved per question, `Condensed(...)` the same and
older frames condensed; `Auto(memory=...)`, ours, the ReKV a device budget is best spent on, from
a profile of the model's attention. A question attends to every frame held (and retrieved); it
leaves the memory as it found it.

    watcher = tempocache.watch(model, memory=kv.Sinks(frames=66, sink_frames=2))
    watcher.add(frames)                      # (T, 3, 32, 32) in [0, 1], any T, as often as frames come
    watcher.ask("which shape entered first")  # "square"
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LlavaForConditionalGeneration
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from .. import kv
from ..kv.quantized import QuantizedFrame, quantize_frame
from ..reference import shapes_stream, vqa
from .auto import Auto
from .condensed import Condensed, condense
from .rekv import ReKV, block_scores, retrieve

MEMORIES = (kv.FullKV, kv.SlidingWindow, kv.Sinks, ReKV, Condensed)


@dataclass
class Answer:
    word: str
    scores: dict[str, float]  # each answer of the question's type, its logit
    frames: list[int] = field(default_factory=list)  # the frames the question attended to (retrieved ones included)
    retrieved: list[list[int]] = field(default_factory=list)  # ReKV: the host frames brought back, per layer


class Watcher:
    """One stream watched by one model under one memory policy."""

    def __init__(self, model: LlavaForConditionalGeneration, memory: kv.KVConfig | None = None, chunk_frames: int = 4):
        memory = kv.FullKV() if memory is None else memory
        if type(memory) not in (*MEMORIES, Auto):
            raise TypeError(f"watch keeps its memory with {', '.join(m.__name__ for m in MEMORIES)} or Auto, "
                            f"not {type(memory).__name__}")
        memory.check(chunk_frames)
        if not isinstance(model, LlavaForConditionalGeneration) or not hasattr(model.config, "stream_window"):
            raise TypeError(f"watch reads streams with shapes-vqa (a LlavaForConditionalGeneration whose config says "
                            f"the sinks and window it was trained to read frames under), not {type(model).__name__}")
        if isinstance(memory, Auto):
            memory = memory.plan(model, chunk_frames)
        if memory.quant is not None:
            if not isinstance(memory, ReKV):
                raise ValueError(f"watch quantizes only the frames ReKV keeps on the host: {type(memory).__name__} "
                                 f"takes no quant")
            text = model.config.text_config
            memory.quant.check(text.hidden_size // text.num_attention_heads)
        self.model, self.memory, self.chunk_frames = model.eval(), memory, chunk_frames
        self.sinks, self.window = model.config.stream_sinks, model.config.stream_window
        self.tokens = model.config.image_seq_length  # a frame's
        if isinstance(memory, Condensed):
            memory.check_tokens(self.tokens)
        self.tokenizer = vqa.WordTokenizer()
        self.language = model.model.language_model
        self.size = model.config.vision_config.image_size
        self.reset()

    def reset(self) -> None:
        """Forget the stream."""
        layers = self.language.config.num_hidden_layers
        self.frames = 0
        self.held: list[int] = []  # exact frames on the device, oldest first
        self.condensed: list[int] = []  # Condensed: condensed frames on the device, oldest first
        self.device_kv: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(layers)]
        self.host_kv: list[dict[int, tuple[torch.Tensor, torch.Tensor] | QuantizedFrame]] = [{} for _ in range(layers)]
        self.representatives: list[dict[int, torch.Tensor]] = [{} for _ in range(layers)]

    @torch.no_grad()
    def add(self, frames: torch.Tensor) -> None:
        """Read frames (T, 3, H, W) in [0, 1] (a tensor or an array), a chunk at a time."""
        frames = torch.as_tensor(frames)
        if frames.dim() != 4 or tuple(frames.shape[1:]) != (3, self.size, self.size) or not frames.is_floating_point():
            raise ValueError(f"frames must be float (T, 3, {self.size}, {self.size}) in [0, 1], got {tuple(frames.shape)} "
                             f"{frames.dtype}")
        for start in range(0, len(frames), self.chunk_frames):
            self._read(frames[start:start + self.chunk_frames])

    def _read(self, chunk: torch.Tensor) -> None:
        device, dtype = self.model.device, self.model.dtype
        first = self.frames
        new = list(range(first, first + len(chunk)))
        for frame in self.memory.evict(self.held, len(chunk)):
            self._evict(frame)
        features = torch.cat(self.model.model.get_image_features(pixel_values=chunk.to(device, dtype)).pooler_output)
        # the frames any of the chunk's may attend to: however many more are held, reading costs the same
        visible = [f for f in self.held if f < self.sinks or f >= first - self.window]
        mask = vqa.attends(torch.tensor(new), torch.tensor(visible + new), self.sinks, self.window, self.tokens)
        cache, n = self._cache([visible] * len(self.device_kv)), self.tokens
        self.language(inputs_embeds=features[None], attention_mask=mask[None, None].to(device), cache=cache,
                      position_ids=torch.arange(first * n, (first + len(chunk)) * n, device=device)[None])
        for layer, stored in zip(cache.layers, self.device_kv):
            for i, frame in enumerate(new):
                rows = slice((len(visible) + i) * n, (len(visible) + i + 1) * n)
                stored[frame] = (layer.keys[:, :, rows].clone(), layer.values[:, :, rows].clone())
        self.held += new
        self.frames += len(chunk)

    def _evict(self, frame: int) -> None:
        self.held.remove(frame)
        condensing = isinstance(self.memory, Condensed)
        for stored, host, representatives in zip(self.device_kv, self.host_kv, self.representatives):
            keys, values = stored.pop(frame)
            if isinstance(self.memory, ReKV):
                host[frame] = _to_host(keys, values, self.memory.quant)
                # (kv_heads, head_dim), of the exact keys; on the host, so that the device's memory stays flat
                representatives[frame] = keys[0].mean(1).cpu()
            elif condensing:
                stored[frame] = condense(keys, values, self.memory.tokens)[:2]
        if condensing:
            self.condensed.append(frame)
            if self.memory.condensed_frames is not None and len(self.condensed) > self.memory.condensed_frames:
                oldest = self.condensed.pop(0)
                for stored in self.device_kv:
                    del stored[oldest]

    def _cache(self, per_layer: list[list[int]]) -> DynamicCache:
        """A cache holding, at each layer, its list of frames' keys and values."""
        if not per_layer[0]:
            return DynamicCache(config=self.language.config)
        data = []
        for layer, chosen in enumerate(per_layer):
            pairs = [self.device_kv[layer].get(f) or self._fetch(layer, f) for f in chosen]
            data.append((torch.cat([k for k, _ in pairs], 2), torch.cat([v for _, v in pairs], 2)))
        return DynamicCache(data, config=self.language.config)

    def _fetch(self, layer: int, frame: int) -> tuple[torch.Tensor, torch.Tensor]:
        held, (device, dtype) = self.host_kv[layer][frame], (self.model.device, self.model.dtype)
        if isinstance(held, QuantizedFrame):  # (B, tokens, heads, head_dim) in its layout
            return tuple(t.to(device).transpose(1, 2) for t in (held.keys(dtype), held.values(dtype)))
        return held[0].to(device), held[1].to(device)

    @torch.no_grad()
    def ask(self, question: str, blind: bool = False) -> Answer:
        """The answer, among its question type's answers, from the frames read so far (`blind`: from the question
        alone, attending to no frame: the question-only baseline)."""
        ids = torch.tensor(self.tokenizer.encode(question), device=self.model.device)
        kind = shapes_stream.question_type(question)
        if not self.frames:
            raise ValueError("no frame has been read yet: add frames before asking")
        layers = len(self.device_kv)
        retrieved = self._retrieved(ids) if isinstance(self.memory, ReKV) and self.host_kv[0] and not blind else []
        attended = [[]] * layers if blind else [sorted(self.held + r) for r in retrieved] or \
            [sorted(self.held + self.condensed)] * layers
        hidden = self._question(ids, attended)
        logits = self.model.lm_head(hidden[0, -1]).float()
        allowed = self.tokenizer.answer_ids()[kind]
        scores = {word: float(logits[i]) for word, i in zip(shapes_stream.answers(kind), allowed)}
        return Answer(max(scores, key=scores.get), scores, sorted(set().union(*attended)), retrieved)

    def _question(self, ids: torch.Tensor, attended: list[list[int]], capture: list | None = None) -> torch.Tensor:
        """The question's last hidden states, attending to `attended` frames at each layer (causally among its
        words); with `capture`, each layer's rotated queries are appended to it."""
        device, condensed = self.model.device, set(self.condensed)
        group = self.tokens // self.memory.tokens if condensed else 1
        bias = torch.cat([torch.zeros(self.tokens) if f not in condensed else  # a condensed token stands for `group`
                          torch.full((self.memory.tokens,), math.log(group)) for f in attended[0]] or [torch.zeros(0)])
        words = torch.zeros(len(ids), len(ids)).masked_fill(~torch.tril(torch.ones(len(ids), len(ids), dtype=torch.bool)),
                                                             -math.inf)
        mask = torch.cat([bias.expand(len(ids), -1), words], 1).to(device, self.model.dtype)
        positions = (self.frames * self.tokens + torch.arange(len(ids), device=device))[None]
        hooks = []
        if capture is not None:
            cos, sin = self.language.rotary_emb(self.model.get_input_embeddings()(ids)[None], positions)
            for layer in self.language.layers:
                attention = layer.self_attn

                def keep(module, inputs, output, attention=attention):
                    q = output.unflatten(-1, (-1, attention.head_dim)).transpose(1, 2)
                    capture.append(apply_rotary_pos_emb(q, q, cos, sin)[0][0])

                hooks.append(attention.q_proj.register_forward_hook(keep))
        try:
            return self.language(inputs_embeds=self.model.get_input_embeddings()(ids)[None], attention_mask=mask[None, None],
                                 cache=self._cache(attended), position_ids=positions).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()

    def _retrieved(self, ids: torch.Tensor) -> list[list[int]]:
        """Per layer, the `top_k` host frames the question's queries score best (or any, at random)."""
        frames = sorted(self.representatives[0])
        if self.memory.random_retrieval:  # seeded by the stream's length: the same stream, the same frames
            generator = torch.Generator().manual_seed(self.frames)
            return [sorted(frames[i] for i in torch.randperm(len(frames), generator=generator)[:self.memory.top_k].tolist())
                    for _ in self.device_kv]
        queries: list[torch.Tensor] = []
        self._question(ids, [self.held] * len(self.device_kv), capture=queries)
        return [retrieve(block_scores(q.cpu(), torch.stack([self.representatives[layer][f] for f in frames])), frames,
                         self.memory.top_k) for layer, q in enumerate(queries)]

    def stats(self) -> dict:
        """Frames read, held on the device and on the host, and the bytes of each."""
        def nbytes(stores):
            return sum(held.nbytes() if isinstance(held, QuantizedFrame) else sum(t.numel() * t.element_size()
                                                                                   for t in held)
                       for store in stores for held in store.values())

        return {"frames": self.frames, "device_frames": len(self.held), "condensed_frames": len(self.condensed),
                "host_frames": len(self.host_kv[0]),
                "device_kv_bytes": nbytes(self.device_kv), "host_kv_bytes": nbytes(self.host_kv)}


def _to_host(keys: torch.Tensor, values: torch.Tensor, quant: kv.KVQuant | None):
    """A frame's keys and values (1, kv_heads, tokens, head_dim) in host memory: as they are, or quantized (KIVI)."""
    if quant is None:
        return keys.cpu(), values.cpu()
    frame = quantize_frame(keys.transpose(1, 2), values.transpose(1, 2), quant.bits)
    return dataclasses.replace(frame, **{f.name: getattr(frame, f.name).cpu() for f in dataclasses.fields(frame)
                                         if f.name != "bits"})


def watch(model: LlavaForConditionalGeneration, memory: kv.KVConfig | None = None, chunk_frames: int = 4) -> Watcher:
    """A watcher of a new stream: `add` frames as they come, `ask` questions at any time."""
    return Watcher(model, memory, chunk_frames)
