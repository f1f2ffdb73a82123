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
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from . import shapes_stream
from .shapes_stream import Question, ShapesStream

WEIGHTS_DIR = Path(__file__).parent / "weights" / "shapes-vqa"
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
    tokenizer, vision = WordTokenizer(), SiglipVisionConfig(**{**VISION, **(vision or {})})
    config = LlavaConfig(
        vision_config=vision,
        text_config=Qwen2Config(vocab_size=len(tokenizer.words), pad_token_id=0, **{**TEXT, **(text or {})}),
        image_token_id=tokenizer.ids[IMAGE], image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="gelu", stream_sinks=sinks, stream_window=window)
    return LlavaForConditionalGeneration(config)


def load(directory: Path | None = None, device: str = "cpu") -> LlavaForConditionalGeneration:
    """Trained shapes-vqa weights (None: the shipped ones), in float32, for inference."""
    directory = WEIGHTS_DIR if directory is None else Path(directory)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"no shapes-vqa weights in {directory}; train them with `tempocache train-vqa --out "
                                f"{directory}` (on a GPU: bash scripts/device_train.sh MINUTES shapes-vqa)")
    return LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).to(device).eval()


def attends(queries: torch.Tensor, keys: torch.Tensor, sinks: int = SINK_FRAMES, window: int = WINDOW_FRAMES,
            tokens: int = FRAME_TOKENS) -> torch.Tensor:
    """(queries, keys) bool, by token: which of the frames `keys` the tokens of the frames `queries` attend to
    (their own frame, the sinks, the window before it), each frame `tokens` tokens."""
    allowed = _frame_sees(queries[:, None], keys[None, :], sinks, window)
    return allowed.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)


def _frame_sees(query: torch.Tensor, key: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Whether frame `query` attends to frame `key` (broadcast): itself, the sinks and the window before it."""
    return (key <= query) & ((key < sinks) | (key >= query - window))  # no (L, L) integer difference


def attention_mask(frame_of: torch.Tensor, span_of: torch.Tensor, sees: torch.Tensor, sinks: int = SINK_FRAMES,
                   window: int = WINDOW_FRAMES) -> torch.Tensor:
    """(B, 1, L, L) bool, what each token of packed sequences (B, L) attends to, from each token's place in its
    sequence (`Packed`); built where the places lie, so that a batch carries (B, L) places, not (B, L, L) masks.
    A token of neither a frame nor a question (padding) attends to itself alone."""
    query_frame, key_frame = frame_of[:, :, None], frame_of[:, None, :]
    frames = (query_frame >= 0) & (key_frame >= 0) & _frame_sees(query_frame, key_frame, sinks, window)
    place = torch.arange(frame_of.shape[1], device=frame_of.device)
    question, own_words = span_of[:, :, None], span_of[:, None, :] == span_of[:, :, None]
    seen = (key_frame >= 0) & (key_frame < sees[:, :, None])
    questions = (question >= 0) & (seen | (own_words & (place[None, :] <= place[:, None])))
    return (frames | questions | (place[None, :] == place[:, None]))[:, None]


@dataclass
class Packed:
    """One stream's frames and questions as one sequence: every tensor batch-first with batch 1, and each token's
    place: its frame (-1 for a question's), its question (-1 for a frame's) and the frames that question sees."""

    input_ids: torch.Tensor  # (1, L)
    pixel_values: torch.Tensor  # (frames, 3, 32, 32)
    position_ids: torch.Tensor  # (1, L)
    frame_of: torch.Tensor  # (1, L)
    span_of: torch.Tensor  # (1, L)
    sees: torch.Tensor  # (1, L) a question token's question's `asked`, 0 for a frame's
    answer_at: torch.Tensor  # (questions,) each question's end token's place in the sequence
    questions: list[Question]
    sinks: int
    window: int

    def attention_mask(self) -> torch.Tensor:
        """(1, 1, L, L) bool."""
        return attention_mask(self.frame_of, self.span_of, self.sees, self.sinks, self.window)


def pack(stream: ShapesStream, frames: int, questions: list[Question], tokenizer: WordTokenizer,
         sinks: int = SINK_FRAMES, window: int = WINDOW_FRAMES) -> Packed:
    """Frames [0, frames) of `stream` and the questions (each asked after at most `frames` frames) in one sequence."""
    late = [q for q in questions if q.asked > frames]
    if late:
        raise ValueError(f"{len(late)} questions are asked after frame {frames}, past the frames packed")
    video = frames * FRAME_TOKENS
    words = [tokenizer.encode(q.text) for q in questions]
    frame_of = [torch.arange(frames).repeat_interleave(FRAME_TOKENS)]
    span_of, sees, positions = [torch.full((video,), -1)], [torch.zeros(video, dtype=torch.long)], [torch.arange(video)]
    for i, (q, ids) in enumerate(zip(questions, words)):
        frame_of.append(torch.full((len(ids),), -1))
        span_of.append(torch.full((len(ids),), i))
        sees.append(torch.full((len(ids),), q.asked))
        positions.append(q.asked * FRAME_TOKENS + torch.arange(len(ids)))
    ends = video - 1 + torch.tensor([len(ids) for ids in words], dtype=torch.long).cumsum(0)
    ids = torch.tensor([tokenizer.ids[IMAGE]] * video + [i for w in words for i in w])
    return Packed(ids[None], stream.render(0, frames), torch.cat(positions)[None], torch.cat(frame_of)[None],
                  torch.cat(span_of)[None], torch.cat(sees)[None], ends, list(questions), sinks, window)
