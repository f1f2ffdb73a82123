"""shapes-vqa's architecture and objective: a small video-language model of transformers classes for ShapesStream.

`LlavaForConditionalGeneration`: a SigLIP vision tower over each 32x32 frame (patches of 8: 16
tokens a frame), LLaVA's projector, and a Qwen2 text model (grouped key-value heads) that reads
the frames' tokens as a stream, then a question, and answers it in one word at the question's
last token. Training sees what streaming inference sees (`attention_mask`):

    a frame's tokens    attend to its own frame, the first `sinks` frames and the `window` frames
                        before it (StreamingLLM's sinks + window, by frame);
    a question's tokens attend to every frame before it was asked, and causally to its own words.

So the keys and values a stream leaves are those of a sinks + window model whatever memory
holds them, and a question reading every frame's (full KV) is the trained oracle. Positions
are a frame's `16 * frame + token`, a question's `16 * asked + word`: several questions about
one stream, asked at different frames, are packed after it in one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from . import shapes_stream
from .shapes_stream import Question, ShapesStream

PAD, IMAGE, END = "<pad>", "<image>", "?"
FRAME_TOKENS = 16  # (32 / 8) ** 2 patches
SINK_FRAMES, WINDOW_FRAMES = 2, shapes_stream.WINDOW_FRAMES
VISION = dict(image_size=32, patch_size=8, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=4)
TEXT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=1 << 20, rope_theta=100_000.0)


class WordTokenizer:
    """One id per word of ShapesStream's questions and answers (after the pad, image and end tokens)."""

    def __init__(self):
        self.words = (PAD, IMAGE, END, *shapes_stream.vocabulary())
        self.ids = {w: i for i, w in enumerate(self.words)}

    def encode(self, question: str) -> list[int]:
        """A question's word ids, ending with the end token (`?`) at which the answer is read."""
        words = question.rstrip("?").split()
        unknown = [w for w in words if w not in self.ids or w in (PAD, IMAGE, END)]
        if not words or unknown:
            raise ValueError(f"{question!r}: {'unknown words ' + ', '.join(map(repr, unknown)) if unknown else 'empty'}"
                             f"; questions use the words {', '.join(shapes_stream.vocabulary())}")
        return [self.ids[w] for w in words] + [self.ids[END]]

    def answer_ids(self) -> dict[str, list[int]]:
        """Each question type's answer words' ids, in `shapes_stream.answers` order."""
        return {kind: [self.ids[a] for a in shapes_stream.answers(kind)] for kind in shapes_stream.QUESTION_TYPES}


def build_model(vision: dict | None = None, text: dict | None = None, sinks: int = SINK_FRAMES,
                window: int = WINDOW_FRAMES) -> LlavaForConditionalGeneration:
    """An untrained shapes-vqa (`vision`, `text`: config overrides); its config records the sinks and window its
    frames are read under (`stream_sinks`, `stream_window`), for whoever streams it."""
    tokenizer = WordTokenizer()
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(**{**VISION, **(vision or {})}),
        text_config=Qwen2Config(vocab_size=len(tokenizer.words), pad_token_id=0, **{**TEXT, **(text or {})}),
        image_token_id=tokenizer.ids[IMAGE], image_seq_length=FRAME_TOKENS, vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="gelu", stream_sinks=sinks, stream_window=window)
    return LlavaForConditionalGeneration(config)


def attends(queries: torch.Tensor, keys: torch.Tensor, sinks: int = SINK_FRAMES, window: int = WINDOW_FRAMES,
            tokens: int = FRAME_TOKENS) -> torch.Tensor:
    """(queries, keys) bool, by token: which of the frames `keys` the tokens of the frames `queries` attend to
    (their own frame, the sinks, the window before it), each frame `tokens` tokens."""
    query, key = queries[:, None], keys[None, :]
    allowed = (key <= query) & ((key < sinks) | (query - key <= window))
    return allowed.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)


@dataclass
class Packed:
    """One stream's frames and questions as one sequence: every tensor batch-first with batch 1."""

    input_ids: torch.Tensor  # (1, L)
    pixel_values: torch.Tensor  # (frames, 3, 32, 32)
    attention_mask: torch.Tensor  # (1, 1, L, L) bool
    position_ids: torch.Tensor  # (1, L)
    answer_at: torch.Tensor  # (questions,) each question's end token's place in the sequence
    questions: list[Question]


def pack(stream: ShapesStream, frames: int, questions: list[Question], tokenizer: WordTokenizer,
         sinks: int = SINK_FRAMES, window: int = WINDOW_FRAMES) -> Packed:
    """Frames [0, frames) of `stream` and the questions (each asked after at most `frames` frames) in one sequence."""
    late = [q for q in questions if q.asked > frames]
    if late:
        raise ValueError(f"{len(late)} questions are asked after frame {frames}, past the frames packed")
    video = frames * FRAME_TOKENS
    words = [tokenizer.encode(q.text) for q in questions]
    length = video + sum(map(len, words))
    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[:video, :video] = attends(torch.arange(frames), torch.arange(frames), sinks, window)
    positions, ends, start = [torch.arange(video)], [], video
    for q, ids in zip(questions, words):
        span = slice(start, start + len(ids))
        mask[span, :q.asked * FRAME_TOKENS] = True
        mask[span, span] = torch.tril(torch.ones(len(ids), len(ids), dtype=torch.bool))
        positions.append(q.asked * FRAME_TOKENS + torch.arange(len(ids)))
        ends.append(span.stop - 1)
        start = span.stop
    ids = torch.tensor([tokenizer.ids[IMAGE]] * video + [i for w in words for i in w])
    return Packed(ids[None], stream.render(0, frames), mask[None, None], torch.cat(positions)[None],
                  torch.tensor(ends), list(questions))
