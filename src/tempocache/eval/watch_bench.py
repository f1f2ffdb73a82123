"""`tempocache watch-bench`: every memory policy of `tempocache.watch` on the same held-out ShapesStream questions.

Each held-out stream is read frame by frame under each memory, and each of its questions asked
when its frame comes (the questions of all streams balanced by answer within each type first).
Per memory: accuracy overall, by question type, by distance bucket and by both; the KV bytes on
the device (the most held while reading, and the most at a question, retrieved frames included)
and on the host; for ReKV, how often a question's evidence frame, if on the host, was brought
back (per layer); the median time to answer. Beside them: the question alone (the blind
baseline) and ReKV retrieving at random; and a condensed memory of older frames.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .. import kv  # noqa: E402
from ..reference import shapes_stream, vqa  # noqa: E402
from ..understanding import Auto, Condensed, ReKV, watch  # noqa: E402

BLIND = "question alone (blind)"


def default_memories(budgets: tuple[int, ...]) -> dict[str, kv.KVConfig | None]:
    """Full KV, and at each budget of device frames: sinks + window, ReKV (a quarter of the budget retrieved), its
    4- and 2-bit host frames, ReKV retrieving at random, a condensed memory (half the budget exact, the other
    half as 16 times as many frames of one token) and Auto (its own split and host bits); None is the blind
    baseline."""
    memories: dict[str, kv.KVConfig | None] = {"full KV": kv.FullKV(), BLIND: None}
    sinks = vqa.SINK_FRAMES
    for budget in budgets:
        k = max(1, budget // 4)
        held = budget - k
        memories |= {
            f"sinks + window ({budget})": kv.Sinks(frames=budget, sink_frames=sinks),
            f"ReKV ({held} + top {k})": ReKV(frames=held, sink_frames=sinks, top_k=k),
            f"ReKV ({held} + top {k}), int4 host": ReKV(frames=held, sink_frames=sinks, top_k=k, quant=kv.KVQuant(bits=4)),
            f"ReKV ({held} + top {k}), int2 host": ReKV(frames=held, sink_frames=sinks, top_k=k, quant=kv.KVQuant(bits=2)),
            f"ReKV ({held} + random {k})": ReKV(frames=held, sink_frames=sinks, top_k=k, random_retrieval=True),
            f"condensed ({budget // 2} + {8 * budget} of 1 token)": Condensed(
                frames=budget // 2, sink_frames=sinks, tokens=1, condensed_frames=8 * budget),
            f"Auto ({budget})": Auto(memory_frames=budget),
        }
    return memories


@torch.no_grad()
def run_watch_bench(model, out: Path, streams: int = 32, frames: int = 512, questions: int = 32,
                    budgets: tuple[int, ...] = (16, 32, 64), chunk_frames: int = 4, seed: int = 0) -> dict:
    """Every memory of `default_memories(budgets)` on the same questions: results.json, table.md, memory.png, written
    again after each memory."""
    work = shapes_stream.held_out_questions(streams, frames, questions, seed)
    result = {"frames": frames, "streams": streams, "questions": sum(len(q) for _, q in work), "budgets": list(budgets),
              "chunk_frames": chunk_frames, "window": model.config.stream_window, "memories": {}}
    for name, memory in default_memories(budgets).items():
        plan = memory.plan(model, chunk_frames) if isinstance(memory, Auto) else None  # once, for every stream
        memory = plan or memory
        accuracy, recall, seconds = shapes_stream.Accuracy(), [], []
        device_peak = question_peak = host_peak = 0
        for stream, asked in work:
            watcher = watch(model, memory or kv.FullKV(), chunk_frames)
            for q in asked:
                watcher.add(stream.render(watcher.frames, q.asked))
                start = time.perf_counter()
                answer = watcher.ask(q.text, blind=memory is None)
                seconds.append(time.perf_counter() - start)
                stats = watcher.stats()
                device_peak, host_peak = max(device_peak, stats["device_kv_bytes"]), max(host_peak, stats["host_kv_bytes"])
                frame_bytes = stats["device_kv_bytes"] / max(1, stats["device_frames"])
                question_peak = max(question_peak, stats["device_kv_bytes"] + frame_bytes * max(map(len, answer.retrieved),
                                                                                                  default=0))
                if answer.retrieved and q.evidence in watcher.host_kv[0]:
                    recall.append(sum(q.evidence in r for r in answer.retrieved) / len(answer.retrieved))
                accuracy.add(q.kind, q.bucket(result["window"]), answer.word == q.answer)
        result["memories"][name] = {
            **accuracy.summary(),
            "device_kv_bytes": device_peak, "device_kv_bytes_at_question": int(question_peak), "host_kv_bytes": host_peak,
            "evidence_recall": statistics.mean(recall) if recall else None, "answer_seconds": statistics.median(seconds),
            "plan": repr(plan) if plan else None}
        print(name, json.dumps(result["memories"][name]["accuracy"]), flush=True)
        write_report(result, out)  # after each memory: a run cut short keeps the memories it finished
    return result


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(table(result))
    plot(result, out / "memory.png")


def table(result: dict) -> str:
    full = result["memories"]["full KV"]["device_kv_bytes_at_question"]
    lines = ["| memory | device KV at a question (of full KV's) | host KV (MB) | accuracy | inside | beyond | far | "
             "evidence recall | answer (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["memories"].items():
        acc = row["accuracy"]
        cells = [f"{acc[b]:.2f}" if b in acc else "-" for b in ("all", *shapes_stream.BUCKETS)]
        recall = f"{row['evidence_recall']:.2f}" if row["evidence_recall"] is not None else "-"
        share = "0" if name == BLIND else f"{row['device_kv_bytes_at_question'] / full:.1%}"
        lines.append(f"| {name} | {share} | {row['host_kv_bytes'] / 1e6:.1f} | {' | '.join(cells)} | {recall} | "
                     f"{row['answer_seconds'] * 1000:.1f} |")
    return "\n".join(lines) + (f"\n\n{result['questions']} held-out questions on {result['streams']} streams of "
                               f"{result['frames']} frames, balanced by answer within each type; buckets against the "
                               f"model's {result['window']}-frame window.\n")


def plot(result: dict, path: Path) -> None:
    """Accuracy on questions beyond the window against the device KV at a question, one mark per memory."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in result["memories"].items():
        beyond = [row["accuracy"][b] for b in ("beyond", "far") if b in row["accuracy"]]
        if beyond:
            ax.scatter(row["device_kv_bytes_at_question"] / 1e6, statistics.mean(beyond), label=name, s=18)
    ax.set_xlabel("device KV at a question (MB)")
    ax.set_ylabel("accuracy beyond the window")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
