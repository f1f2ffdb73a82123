"""Model cards for the shipped models and the evaluator: `python -m tempocache.reference.card`.

Reads each model's `training.json`, the evaluation in
`benchmarks/results/reference_eval.json` and any at other clip lengths
(`reference_eval_<model>_<N>frames.json` beside it; an editor's in `reference_eval_<model>.json`;
shapes-vqa's, `eval-vqa --save`'s, in `vqa_eval_<N>frames.json`), draws the loss curve and a grid
of samples on held-out captions (an editor's: held-out edits; shapes-vqa's: its training answers
right by question type), and writes README.md next to the weights.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..eval.evaluator import WEIGHTS_DIR as EVALUATOR_DIR  # noqa: E402
from ..generation import generate, load_pipeline  # noqa: E402
from . import shapes_stream, shapesworld, vqa  # noqa: E402
from .edits import KINDS, held_out_edits, render_edit  # noqa: E402
from .models import SPECS, ReferenceSpec, load_weights  # noqa: E402

SAMPLE_CAPTIONS = 8


def plot_loss(state: dict, path: Path, title: str) -> None:
    steps, losses = np.array(state["losses"]).T
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=1)
    ax.set(xlabel="step", ylabel="training loss", title=title, yscale="log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_samples(spec: ReferenceSpec, path: Path, device: str) -> None:
    scenes = shapesworld.held_out_scenes(SAMPLE_CAPTIONS, seed=1, with_motion=spec.is_video)
    captions = [s.caption(spec.is_video) for s in scenes]
    clips = generate(captions, model=spec.name, device=device, pipe=load_pipeline(spec.name, device))
    t = clips.shape[1]
    fig, axes = plt.subplots(len(captions), t, figsize=(1.1 * t + 3.6, 1.15 * len(captions)), squeeze=False)
    for row, (caption, clip) in enumerate(zip(captions, clips)):
        for col in range(t):
            axes[row, col].imshow(clip[col], interpolation="nearest")
            axes[row, col].axis("off")
        axes[row, 0].text(-4, 16, caption.replace(" and ", "\nand ").replace(" on a", "\non a"), ha="right", va="center", fontsize=7)
    fig.suptitle(f"{spec.name}: held-out captions, default settings, seed i for row i", fontsize=9)
    fig.subplots_adjust(left=0.36 if t > 1 else 0.7, right=0.99, top=0.93, bottom=0.01, wspace=0.05, hspace=0.1)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _quality_lines(spec: ReferenceSpec, evaluations: list[dict]) -> list[str]:
    """The accuracy table, one column per evaluated clip length."""
    first = evaluations[0]
    lengths = [e.get("frames", spec.num_frames) for e in evaluations]
    columns = [f"{n} frames" for n in lengths] if spec.is_video else ["semantic accuracy"]
    lines = [
        f"{first['captions']} held-out captions ({first['two_object_captions']} with two objects), "
        f"{first['samples_per_caption']} samples each, {first['steps']} steps, guidance {first['guidance']}, "
        f"seed {first['seed']}, on {first['device']} ({first['date']}); `tempocache eval-reference --model {spec.name}"
        + (" --frames N`." if spec.is_video else "`."),
        "",
        "| attribute | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    lines += [f"| {key} | " + " | ".join(f"{e['semantic_accuracy'][key]:.3f}" for e in evaluations) + " |"
              for key in first["semantic_accuracy"]]
    distances = ", ".join(f"{e['frechet_distance']:.2f} (real vs real {e['frechet_distance_real_vs_real']:.2f})"
                          + (f" at {n} frames" if spec.is_video else "") for n, e in zip(lengths, evaluations))
    return [*lines, "", f"Fréchet distance to real clips of the same captions (evaluator features): {distances}."]


def _clip_lengths(state: dict, spec: ReferenceSpec) -> str:
    """The clip lengths trained on, per run of runs with the same lengths."""
    runs = [tuple(s.get("frames", [spec.num_frames])) for s in state["sessions"]]
    parts, first = [], 1
    for lengths, group in itertools.groupby(runs):
        last = first + len(list(group)) - 1
        span = f"runs {first}-{last}" if last > first else f"run {first}"
        parts.append(f"{'/'.join(map(str, lengths))} frames in {span}")
        first = last + 1
    return "; ".join(parts)


def _draw_and_load(spec: ReferenceSpec, draw_samples, device: str) -> tuple[dict, dict, object, object]:
    """A card's loss curve and samples drawn; the model's training state, transformer config and weights."""
    directory = spec.directory
    state = json.loads((directory / "training.json").read_text())
    config = json.loads((directory / "transformer" / "config.json").read_text())
    plot_loss(state, directory / "loss.png", f"{spec.name} flow-matching loss")
    draw_samples(spec, directory / "samples.png", device)
    return state, config, *load_weights(directory, spec)


def write_model_card(spec: ReferenceSpec, evaluations: list[dict], device: str) -> Path:
    """Write `spec`'s README.md; `evaluations`: its full-compute evaluations, the default clip length first."""
    directory = spec.directory
    state, config, transformer, text_encoder = _draw_and_load(spec, plot_samples, device)
    n_transformer = sum(p.numel() for p in transformer.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    devices = sorted({s["device"] for s in state["sessions"]})
    kind = "text-to-video" if spec.is_video else "text-to-image"
    arch = {k: v for k, v in config.items() if not k.startswith("_")}
    lines = [
        f"# {spec.name}",
        "",
        f"A {kind} reference model for tempocache: diffusers' `{config['_class_name']}` in pixel space, "
        f"trained from scratch on ShapesWorld ({'video' if spec.is_video else 'single-frame'} 32x32 RGB).",
        "",
        "## Architecture",
        f"- transformer: `{config['_class_name']}`, {n_transformer / 1e6:.2f}M parameters, config: `{json.dumps(arch)}`",
        f"- text: word embeddings + 2 transformer layers (`WordEncoder`, {n_text / 1e6:.2f}M parameters) over a "
        f"{len(shapesworld.vocabulary())}-word vocabulary, fed as `encoder_hidden_states`; the empty caption is the unconditional input",
        "- sampling: `FlowMatchEulerDiscreteScheduler` (shift 1.0), classifier-free guidance, "
        f"default {spec.default_steps} steps, guidance {spec.default_guidance}",
        "- weights: fp16 safetensors (EMA of the training weights, decay 0.999)",
        "",
        "## Training",
        "- data: ShapesWorld train split (captions whose object combinations are not held out), fresh clips every step, "
        "10% of captions dropped for guidance"
        + (f"; clip lengths (each batch one, drawn uniformly from the list): {_clip_lengths(state, spec)}"
           if spec.is_video else ""),
        "- objective: flow matching (velocity noise - x0, logit-normal noise levels), AdamW, "
        f"lr per run {', '.join(str(r.get('lr', state['lr'])) for r in state['sessions'])}, "
        f"batch size per run {', '.join(str(r.get('batch_size', state['batch_size'])) for r in state['sessions'])}, "
        + ("bf16 autocast" if spec.is_video else "fp32 with TF32 matmuls"),
        f"- steps: {state['steps']}, time: {state['seconds'] / 60:.1f} min on {', '.join(devices)} "
        f"in {len(state['sessions'])} runs, seed {state['seed']}",
        f"- final loss (mean of the last 100 steps): {state['losses'][-1][1]:.4f}",
        f"- command (repeated, each run resuming the last): `bash scripts/device_train.sh MINUTES {spec.name}` on the GPU, "
        "`TRAIN_ARGS` giving a run's lr, batch size and clip lengths "
        "(or `tempocache train-reference --model " + spec.name + " --out DIR --minutes M --resume DIR`)",
        "",
        "![loss](loss.png)",
        "",
        "## Quality (full compute, held-out captions)",
    ]
    if evaluations:
        lines += _quality_lines(spec, evaluations)
    else:
        lines.append("Not evaluated yet: run `tempocache eval-reference`.")
    lines += ["", "## Samples", "", "![samples](samples.png)", ""]
    path = directory / "README.md"
    path.write_text("\n".join(lines))
    return path


def plot_edit_samples(spec: ReferenceSpec, path: Path, device: str) -> None:
    """One held-out edit of each kind: the image, the edit made at default settings, the ground truth."""
    from ..editing import edit

    listed = held_out_edits(len(KINDS), seed=1)
    sources, targets = zip(*(render_edit(e)[:2] for e in listed))
    made = edit(list(sources), [e.instruction for e in listed], pipe=load_pipeline(spec.name, device))
    fig, axes = plt.subplots(len(listed), 3, figsize=(6.2, 1.5 * len(listed)), squeeze=False)
    for row, (e, source, image, target) in enumerate(zip(listed, sources, made, targets)):
        for col, (picture, title) in enumerate(((source.permute(1, 2, 0), "image"), (image, "edited"),
                                                (target.permute(1, 2, 0), "ground truth"))):
            axes[row, col].imshow(picture, interpolation="nearest")
            axes[row, col].axis("off")
            if row == 0:
                axes[row, col].set_title(title, fontsize=8)
        axes[row, 0].text(-4, 16, e.instruction.replace(" the ", "\nthe "), ha="right", va="center", fontsize=7)
    fig.suptitle(f"{spec.name}: held-out edits, default settings, seed i for row i", fontsize=9)
    fig.subplots_adjust(left=0.32, right=0.99, top=0.9, bottom=0.01, wspace=0.05, hspace=0.1)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_editor_card(spec: ReferenceSpec, evaluation: dict | None, device: str) -> Path:
    """Write an editor's README.md; `evaluation`: `eval.edit_quality.evaluate_editor`'s, if it was run."""
    directory = spec.directory
    state, config, transformer, text_encoder = _draw_and_load(spec, plot_edit_samples, device)
    devices = sorted({s["device"] for s in state["sessions"]})
    arch = {k: v for k, v in config.items() if not k.startswith("_")}
    lines = [
        f"# {spec.name}",
        "",
        f"An instruction-based image editor for tempocache (the reference for region-aware editing): diffusers' "
        f"`{config['_class_name']}` in pixel space, the image it edits in context as diffusers' `FluxKontextPipeline` "
        f"places it (its tokens after the noisy ones, their ids offset on the first axis), fine-tuned from "
        f"{spec.init_from}'s weights on ShapesWorld edits (32x32 RGB).",
        "",
        "## Architecture",
        f"- transformer: `{config['_class_name']}`, {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M "
        f"parameters, {spec.init_from}'s config: `{json.dumps(arch)}`",
        f"- text: {spec.init_from}'s `WordEncoder` ({sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M "
        f"parameters), its vocabulary grown to {text_encoder.config['vocab_size']} words by those only instructions "
        "use (a caption's words keep their ids and embeddings); the empty instruction is the unconditional input",
        "- sampling: `FlowMatchEulerDiscreteScheduler` (shift 1.0), classifier-free guidance over the instruction (both "
        f"branches see the image), default {spec.default_steps} steps, guidance {spec.default_guidance}",
        "- weights: fp16 safetensors (EMA of the training weights, decay 0.999)",
        "",
        "## Training",
        "- data: fresh ShapesWorld edits every step (`reference.edits`: recolour, remove, add, move, background, "
        "drawn uniformly), train split (edit combinations not held out), 10% of instructions dropped for guidance",
        "- objective: flow matching of the target image with the source clean in context (logit-normal noise levels), "
        f"AdamW, lr per run {', '.join(str(r['lr']) for r in state['sessions'])}, batch size per run "
        f"{', '.join(str(r['batch_size']) for r in state['sessions'])}, fp32 with TF32 matmuls",
        f"- steps: {state['steps']}, time: {state['seconds'] / 60:.1f} min on {', '.join(devices)} in "
        f"{len(state['sessions'])} runs (the second resuming the first's optimizer), seed {state['seed']}",
        f"- final loss (mean of the last 100 steps): {state['losses'][-1][1]:.4f}",
        f"- command: `TRAIN_ARGS=\"--batch-size 64 --lr 2e-4\" bash scripts/device_train.sh 8 {spec.name}` on the GPU, "
        "twice (or `tempocache train-reference --model " + spec.name + " --out DIR --minutes M`)",
        "",
        "![loss](loss.png)",
        "",
        "## Quality (full compute, held-out edits)",
    ]
    if evaluation:
        lines += [
            f"{evaluation['edits']} held-out edits (the kinds in turn), {evaluation['steps']} steps, guidance "
            f"{evaluation['guidance']}, edit i with seed {evaluation['seed']} + i, on {evaluation['device']} "
            f"({evaluation['date']}); `tempocache eval-reference --model {spec.name}`, judged by "
            "`eval.edit_quality.judge_edits` (bars: changed 0.85, kept 0.9, 30 dB outside the mask).",
            "",
            "| edits | number | changed | kept | both | PSNR outside the mask (median, dB) |",
            "|---|---|---|---|---|---|",
            *(f"| {k} | {q['edits']} | {q['changed']:.3f} | {q['kept']:.3f} | {q['success']:.3f} | "
              f"{q['psnr_outside_median']:.1f} |" for k, q in evaluation["quality"].items()),
        ]
    else:
        lines.append("Not evaluated yet: run `tempocache eval-reference --model " + spec.name + "`.")
    lines += ["", "## Samples", "", "![samples](samples.png)", ""]
    path = directory / "README.md"
    path.write_text("\n".join(lines))
    return path


def plot_answers(state: dict, path: Path) -> None:
    """The share of the training batches' answers right, by question type, against the step."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind in shapes_stream.QUESTION_TYPES:
        points = [(r["step"], r[kind]) for r in state.get("answer_accuracy", []) if kind in r]
        if points:
            ax.plot(*np.array(points).T, lw=1, label=kind)
    ax.set(xlabel="step", ylabel="training answers right", ylim=(0, 1), title="shapes-vqa")
    if ax.lines:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _vqa_table(evaluation: dict) -> list[str]:
    """Accuracy by question type (rows) and distance bucket (columns), with the question counts."""
    accuracy, questions = evaluation["accuracy"], evaluation["questions"]

    def cell(key: str) -> str:
        return f"{accuracy[key]:.2f} ({questions[key]})" if key in accuracy else "-"

    lines = ["| question | " + " | ".join(shapes_stream.BUCKETS) + " | all |", "|---" * (len(shapes_stream.BUCKETS) + 2) + "|"]
    for kind in (*shapes_stream.QUESTION_TYPES, None):
        keys = [f"{kind}/{b}" if kind else b for b in shapes_stream.BUCKETS] + [kind or "all"]
        lines.append(f"| {kind or 'all'} | " + " | ".join(map(cell, keys)) + " |")
    return lines


def write_vqa_card(evaluations: list[dict], directory: Path = vqa.WEIGHTS_DIR) -> Path:
    """Write shapes-vqa's README.md beside its weights; `evaluations`: `eval-vqa --save`'s, one per stream length."""
    state = json.loads((directory / "training.json").read_text())
    model = vqa.load(directory)
    vision, text = model.config.vision_config, model.config.text_config
    plot_loss(state, directory / "loss.png", "shapes-vqa")
    plot_answers(state, directory / "answers.png")
    devices = sorted({s["device"] for s in state["sessions"]})
    weights = [s.get("frame_loss_weight", 0.0) for s in state["sessions"]]  # 0: a run from before the objective
    frame_objective = "" if not any(weights) else (
        ", plus the frame objective (each shape's colour in view, from the mean of a frame's projected tokens, through "
        f"a training-only head) at weight {', '.join(f'{w:g}' for w in weights)} in its runs")
    lines = [
        "# shapes-vqa",
        "",
        "A small video-language model for tempocache's streaming understanding (the reference for `tempocache.watch`): "
        "transformers' `LlavaForConditionalGeneration`, trained from scratch on ShapesStream (32x32 RGB streams and "
        "questions about their events).",
        "",
        "## Architecture",
        f"- {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; vision: `SiglipVisionModel`, "
        f"{vision.image_size}x{vision.image_size} frames in patches of {vision.patch_size} "
        f"({model.config.image_seq_length} tokens a frame), {vision.num_hidden_layers} layers of {vision.hidden_size}; "
        f"LLaVA's projector; text: `Qwen2Model`, {text.num_hidden_layers} layers of {text.hidden_size}, "
        f"{text.num_attention_heads} query and {text.num_key_value_heads} key-value heads, rope theta "
        f"{text.rope_parameters['rope_theta']:g}",
        f"- a frame's tokens attend to their frame, the first {model.config.stream_sinks} frames and the "
        f"{model.config.stream_window} before it; a question's to every frame before it was asked (full KV is the "
        "trained oracle); the answer is the likeliest of its type's at the question's `?`",
        "- weights: fp16 safetensors (EMA of the training weights, decay 0.999)",
        "",
        "## Training",
        f"- data: fresh training streams of {', '.join(map(str, state['frames']))} frames (one length a batch), "
        f"{state['questions']} questions drawn per stream, (shape, colour) pairs of the held-out split never shown",
        "- objective: the answers' cross-entropy over their type's answers" + frame_objective,
        f"- AdamW, lr per run {', '.join(str(r['lr']) for r in state['sessions'])}, batch per run "
        f"{', '.join(str(r['batch_size']) for r in state['sessions'])} streams of the longest length, bf16 autocast",
        f"- steps: {state['steps']}, time: {state['seconds'] / 60:.1f} min on {', '.join(devices)} in "
        f"{len(state['sessions'])} runs, seed {state['seed']}",
        f"- final loss (mean of the last logged steps): {state['losses'][-1][1]:.4f}",
        "- command: `bash scripts/device_train.sh MINUTES shapes-vqa` on the GPU (or `tempocache train-vqa --out DIR "
        "--minutes M`)",
        "",
        "![loss](loss.png) ![answers](answers.png)",
        "",
        "## Quality (full KV, held-out streams)",
        "",
    ]
    if not evaluations:
        lines.append("Not evaluated yet: `tempocache eval-vqa --streams 32 --frames 512 --save "
                     "benchmarks/results/vqa_eval_512frames.json`.")
    for evaluation in sorted(evaluations, key=lambda e: e["frames"]):
        beyond = " (past the longest training stream)" if evaluation["frames"] > max(state["frames"]) else ""
        lines += [f"{evaluation['streams']} held-out streams of {evaluation['frames']} frames{beyond}, questions "
                  "balanced by answer within each type; accuracy (questions):", "", *_vqa_table(evaluation), ""]
    path = directory / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_evaluator_card(report: dict) -> Path:
    state = json.loads((EVALUATOR_DIR / "training.json").read_text())
    lines = [
        "# ShapesWorld evaluator",
        "",
        "A 3D CNN (`tempocache.eval.evaluator.AttributeClassifier`) reading a clip's background colour and, for each "
        "object colour, whether such an object is present, its shape and its motion. Its 256-d penultimate features "
        "give the Fréchet distance. Images are read as static clips.",
        "",
        f"- training: {state['steps']} steps of {state['batch_size']} fresh clips (every caption combination; light "
        f"pixel noise), {state['seconds'] / 60:.1f} min on {state['device']}; `tempocache train-evaluator`",
        f"- accuracy on {report['clips']} fresh real clips of held-out captions (`tempocache eval-evaluator`):",
        "",
        "| attribute | clips | images |",
        "|---|---|---|",
    ]
    for key, value in report["clip_accuracy"].items():
        image = report["image_accuracy"].get(key)
        lines.append(f"| {key} | {value:.3f} | {'-' if image is None else f'{image:.3f}'} |")
    path = EVALUATOR_DIR / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    from ..eval.reference_eval import evaluate_evaluator

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/reference_eval.json"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cards", nargs="+", choices=[*SPECS, "shapes-vqa", "evaluator"],
                        default=[*SPECS, "evaluator"], help="which cards to write (default: the diffusion models' and "
                                                            "the evaluator's)")
    args = parser.parse_args()
    defaults = json.loads(args.results.read_text()) if args.results.exists() else {}
    for name in args.cards:
        if name == "evaluator":
            print(f"wrote {write_evaluator_card(evaluate_evaluator(device=args.device))}")
            continue
        if name == "shapes-vqa":
            saved = args.results.parent.glob("vqa_eval_*frames.json")
            print(f"wrote {write_vqa_card([json.loads(path.read_text()) for path in saved])}")
            continue
        spec = SPECS[name]
        if spec.task == "edit":
            saved = args.results.parent / f"reference_eval_{name}.json"
            evaluation = json.loads(saved.read_text())[name] if saved.exists() else None
            print(f"wrote {write_editor_card(spec, evaluation, args.device)}")
            continue
        evaluations = [defaults[name]] if name in defaults else []
        others = args.results.parent.glob(f"reference_eval_{name}_*frames.json")
        others = sorted((json.loads(path.read_text())[name] for path in others), key=lambda e: e["frames"])
        evaluations += [e for e in others if e["frames"] != spec.num_frames]
        print(f"wrote {write_model_card(spec, evaluations, args.device)}")


if __name__ == "__main__":
    main()
