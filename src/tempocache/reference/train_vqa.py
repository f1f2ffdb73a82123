"""Training and judging shapes-vqa (`reference/vqa.py`) on ShapesStream.

Each sample is one training stream packed with `questions` questions about it (`vqa.pack`: the
frames under the sinks + window mask, each question over every frame before it was asked); a
batch's streams are of one length, drawn from `frames` (short streams are cheap steps, and their
questions easier to find the evidence of), padded to one sequence length. The judge packs held-out streams the same
way, which is full KV's view, and scores the answer (the likeliest of its type's) by question
type and distance bucket.

Answers alone teach the vision tower too little: they name a frame's background from every
patch, but an object's shape only from the few patches it covers, in a handful of questions per
stream, and the tower learns to keep the background and drop the shape. So training adds a dense
objective on every frame, through a head that is not part of the model: from the mean of the
frame's projected tokens, the colour of each shape in view (or that it is absent).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset
from transformers import LlavaForConditionalGeneration

from . import shapes_stream, vqa
from .shapes_stream import ShapesStream
from .train import record_session, step_done, update

TRAIN_FRAMES = (64, 128, 256, 512)
EVAL_FRAMES = 512
QUESTIONS_PER_STREAM = 32
WARMUP_STEPS = 300
FRAME_LOSS_WEIGHT = 0.5
ABSENT = len(shapes_stream.COLOURS)  # a shape's frame target when it is not in view


class PackedStreams(IterableDataset):
    """Endless collated batches of packed training streams, each batch's streams of a length drawn from `frames`:
    `batch_size` streams of the longest, and of a shorter length as many more as fill the same frames (so that a
    step of short streams is not a small one)."""

    def __init__(self, batch_size: int, frames: tuple[int, ...], questions: int, seed: int, split: str = "train"):
        self.batch_size, self.frames, self.questions, self.seed, self.split = batch_size, frames, questions, seed, split

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        tokenizer = vqa.WordTokenizer()
        for batch in range(worker, 1 << 62, workers):
            samples, frames = [], random.Random(self.seed + batch).choice(self.frames)
            most = streams_per_batch(self.batch_size, self.frames, min(self.frames))
            for i in range(streams_per_batch(self.batch_size, self.frames, frames)):
                stream = ShapesStream(self.seed + batch * most + i, frames, self.split)
                asked = stream.questions(self.questions)
                if asked:
                    samples.append((vqa.pack(stream, frames, asked, tokenizer), frame_targets(stream, frames)))
            if samples:
                packed, targets = zip(*samples)
                yield collate(list(packed), list(targets))


def streams_per_batch(batch_size: int, frames: tuple[int, ...], length: int) -> int:
    """How many streams of `length` frames a batch of `batch_size` streams of the longest of `frames` holds."""
    return max(1, batch_size * max(frames) // length)


def frame_targets(stream: ShapesStream, frames: int) -> torch.Tensor:
    """(frames, shapes) long: each shape's colour (its index in COLOURS) in each of the first `frames` frames, ABSENT
    where it is not in view (its centre outside the frame)."""
    colours, size = list(shapes_stream.COLOURS), stream.size
    targets = torch.full((frames, len(shapes_stream.SHAPES)), ABSENT)
    for f, state in enumerate(stream.states[:frames]):
        for shape, colour, x, y in state["objects"]:
            if 0 <= x < size and 0 <= y < size:
                targets[f, shapes_stream.SHAPES.index(shape)] = colours.index(colour)
    return targets


def frame_head(model: LlavaForConditionalGeneration) -> torch.nn.Linear:
    """The training-only head of the frame objective: a frame's mean projected token to each shape's colour logits."""
    return torch.nn.Linear(model.config.text_config.hidden_size, len(shapes_stream.SHAPES) * (ABSENT + 1))


def collate(samples: list[vqa.Packed], targets: list[torch.Tensor] | None = None) -> dict:
    """Samples padded to the longest (padding is no token's frame or question: it attends to itself alone and is
    never read); the questions' distance buckets are by the window the samples were packed under. `targets`: each
    sample's `frame_targets`, for the frame objective."""
    sinks, window = samples[0].sinks, samples[0].window
    if any((s.sinks, s.window) != (sinks, window) for s in samples):
        raise ValueError("a batch packs its samples under one sinks + window mask")
    length = max(s.input_ids.shape[1] for s in samples)
    ids, positions, sees = (torch.zeros(len(samples), length, dtype=torch.long) for _ in range(3))
    frame_of, span_of = (torch.full((len(samples), length), -1) for _ in range(2))
    rows, answers = [], []
    for b, s in enumerate(samples):
        n = s.input_ids.shape[1]
        ids[b, :n], positions[b, :n], sees[b, :n] = s.input_ids[0], s.position_ids[0], s.sees[0]
        frame_of[b, :n], span_of[b, :n] = s.frame_of[0], s.span_of[0]
        rows += [(b, int(at)) for at in s.answer_at]
        answers += [(q.kind, shapes_stream.answers(q.kind).index(q.answer), q.bucket(window)) for q in s.questions]
    return {"input_ids": ids, "pixel_values": torch.cat([s.pixel_values for s in samples]), "position_ids": positions,
            "frame_of": frame_of, "span_of": span_of, "sees": sees, "sinks": sinks, "window": window,
            "rows": torch.tensor(rows), "answers": answers,
            "frame_targets": torch.cat(targets) if targets else None}


def _answer_logits(model, batch: dict, device: str, frames_seen: list | None = None) -> torch.Tensor:
    """(questions, most answers of a type) each question's logits over its type's answers, -inf past them.
    `frames_seen`: a list that gets the projected frame tokens (frames, tokens, hidden)."""
    places = (batch[k].to(device) for k in ("frame_of", "span_of", "sees"))
    projector = model.model.multi_modal_projector
    hook = projector.register_forward_hook(lambda m, i, o: frames_seen.append(o)) if frames_seen is not None else None
    try:
        out = model(**{k: batch[k].to(device) for k in ("input_ids", "pixel_values", "position_ids")},
                    attention_mask=vqa.attention_mask(*places, batch["sinks"], batch["window"]))
    finally:
        if hook is not None:
            hook.remove()
    rows = out.logits[batch["rows"][:, 0], batch["rows"][:, 1]].float()
    allowed = vqa.WordTokenizer().answer_ids()
    most = max(map(len, allowed.values()))
    index = torch.tensor([allowed[kind] + [0] * (most - len(allowed[kind])) for kind, _, _ in batch["answers"]])
    valid = torch.tensor([[j < len(allowed[kind]) for j in range(most)] for kind, _, _ in batch["answers"]])
    return rows.gather(1, index.to(rows.device)).masked_fill(~valid.to(rows.device), -math.inf)


def batch_loss(model, batch: dict, device: str, head: torch.nn.Linear | None = None,
               tally: shapes_stream.Accuracy | None = None) -> torch.Tensor:
    """The answers' cross-entropy; with `head` (`frame_head`), plus the frame objective's, weighted. `tally` counts
    the answers the logits get right."""
    target = torch.tensor([answer for _, answer, _ in batch["answers"]], device=device)
    frames_seen = [] if head is not None else None
    logits = _answer_logits(model, batch, device, frames_seen)
    loss = F.cross_entropy(logits, target)
    if tally is not None:
        for choice, (kind, answer, bucket) in zip(logits.argmax(1).tolist(), batch["answers"]):
            tally.add(kind, bucket, choice == answer)
    if head is None:
        return loss
    colours = head(frames_seen[0].mean(1)).view(-1, ABSENT + 1)  # (frames * shapes, colours + absent)
    return loss + FRAME_LOSS_WEIGHT * F.cross_entropy(colours.float(), batch["frame_targets"].to(device).view(-1))


def train_vqa(out_dir: Path, minutes: float, batch_size: int = 8, lr: float = 3e-4, device: str = "cuda",
              resume_dir: Path | None = None, checkpoint_dir: Path | None = None, seed: int = 0, workers: int = 6,
              frames: tuple[int, ...] = TRAIN_FRAMES, questions: int = QUESTIONS_PER_STREAM, log_every: int = 50,
              vision: dict | None = None, text: dict | None = None) -> dict:
    """Train (or resume training) shapes-vqa for `minutes`; the weights (EMA, fp16) and training.json go to
    `out_dir`; with `checkpoint_dir`, the whole state too, for an exact resume. `frames`: the stream lengths drawn
    from, one per batch; `vision`, `text`: config overrides."""
    torch.manual_seed(seed)
    checkpoint = checkpoint_dir / "shapes-vqa.pt" if checkpoint_dir else None
    full = torch.load(checkpoint, map_location="cpu") if checkpoint and checkpoint.exists() else None
    state = {"model": "shapes-vqa", "steps": 0, "seconds": 0.0, "frames": list(frames), "questions": questions, "seed": seed,
             "losses": [], "sessions": []}
    if resume_dir and (resume_dir / "training.json").exists() and not full:
        model = LlavaForConditionalGeneration.from_pretrained(resume_dir, dtype=torch.float32)
        state = json.loads((resume_dir / "training.json").read_text())
    else:
        model = vqa.build_model(vision, text)
    if full:
        model.load_state_dict(full["model"])
        state = full["state"]
    head = frame_head(model)
    if full and "frame_head" in full:
        head.load_state_dict(full["frame_head"])
    model.to(device).train()
    head.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if full:
        ema.load_state_dict(full["ema"])
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    if full:
        optimizer.load_state_dict(full["optimizer"])
    warmup_from = 0 if full else state["steps"]
    drawn = state["steps"] * streams_per_batch(batch_size, tuple(frames), min(frames))  # a resumed run: streams of its own
    data = PackedStreams(batch_size, tuple(frames), questions, seed * 1_000_003 + drawn)
    loader = DataLoader(data, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    start, running, first_step = time.time(), [], state["steps"]
    print(f"training shapes-vqa: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, from step "
          f"{first_step}, for {minutes} min on {device}", flush=True)
    tally = shapes_stream.Accuracy()
    for batch in loader:
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (state["steps"] - warmup_from + 1) / WARMUP_STEPS)
        with autocast:
            loss = batch_loss(model, batch, device, head, tally)
        update(loss, optimizer, list(model.parameters()), list(ema.parameters()), state["steps"])
        done = step_done(state, running, loss, start, first_step, log_every, minutes)
        if state["steps"] % log_every == 0:  # what the training batches' answers got right, by type, since the last
            right = {k: round(v, 3) for k, v in tally.summary()["accuracy"].items() if k in shapes_stream.QUESTION_TYPES}
            state.setdefault("answer_accuracy", []).append({"step": state["steps"], **right})
            print(f"  answers right: {json.dumps(right)}", flush=True)
            tally = shapes_stream.Accuracy()
        if done:
            break
    record_session(state, start, first_step, device, batch_size=batch_size, lr=lr,
                   frame_loss_weight=FRAME_LOSS_WEIGHT)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(ema).half().save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps(state, indent=1))
    if checkpoint:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "frame_head": head.state_dict(),
                    "optimizer": optimizer.state_dict(), "state": state}, checkpoint)
    return state


@torch.no_grad()
def evaluate_vqa(model: LlavaForConditionalGeneration, streams: int = 32, frames: int = EVAL_FRAMES,
                 questions: int = QUESTIONS_PER_STREAM, device: str = "cpu", seed: int = 0) -> dict:
    """Accuracy with full KV on held-out streams: overall, by question type, by distance bucket and by both, with
    the question counts; the questions balanced by answer within each type."""
    model = model.to(device).eval()
    tokenizer, accuracy = vqa.WordTokenizer(), shapes_stream.Accuracy()
    for stream, mine in shapes_stream.held_out_questions(streams, frames, questions, seed):
        if not mine:
            continue
        sinks, window = model.config.stream_sinks, model.config.stream_window  # what it was trained under
        batch = collate([vqa.pack(stream, frames, mine, tokenizer, sinks, window)])
        chosen = _answer_logits(model, batch, device).argmax(1).tolist()
        for choice, (kind, answer, bucket) in zip(chosen, batch["answers"]):
            accuracy.add(kind, bucket, choice == answer)
    return {"frames": frames, "streams": streams, **accuracy.summary()}
