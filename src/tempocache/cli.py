"""`tempocache generate | edit | stream | stream-bench | eval-stream | bench | cache-quality | quant-quality | calibrate | eval-reference | eval-evaluator | train-reference | train-evaluator | train-vqa | eval-vqa | watch-bench`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Where torchao is installed (the bench's peer), importing diffusers imports it too, whatever the command, and that
# logs torchao's failed loads of optional kernels, torch's deprecation of the enums torchao registers, and diffusers'
# note on torchao checkpoints. Only `bench` runs torchao; every other command silences those loggers.
TORCHAO_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def _generate(args: argparse.Namespace) -> None:
    from .generation import check_output_path, generate, save_clips

    check_output_path(args.output)
    clips = generate(
        args.prompts, model=args.model, steps=args.steps, guidance=args.guidance, seed=args.seed,
        num_frames=args.frames, device=args.device, batch_size=args.batch_size,
    )
    print(f"wrote {save_clips(clips, args.output, fps=args.fps, scale=args.scale).resolve()}")


def _edit(args: argparse.Namespace) -> None:
    from .editing import check_image_path, edit, save_image

    check_image_path(args.output)
    image = edit(args.image, args.instruction, model=args.model, steps=args.steps, guidance=args.guidance,
                 seed=args.seed, device=args.device)
    print(f"wrote {save_image(image, args.output, scale=args.scale).resolve()}")


def _stream(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .streaming import stream
    from .video import MP4Writer, check_video_path

    check_video_path(args.output)
    check_writable(args.output)
    frames = stream(args.model, args.prompt, frames=args.frames, kv=args.kv, steps=args.steps, guidance=args.guidance,
                    seed=args.seed, device=args.device)
    with MP4Writer(args.output, fps=args.fps, scale=args.scale) as writer, \
            tqdm(total=args.frames, unit="frame", desc="streaming") as progress:
        try:
            for chunk in frames:
                writer.write(chunk)
                progress.update(len(chunk))
                progress.set_postfix(kv=f"{frames.stats()['kv_bytes'] / 2**20:.1f} MiB")
        except KeyboardInterrupt:
            print(f"interrupted after {frames.made} frames", file=sys.stderr)
        finally:
            frames.close()
    print(f"wrote {args.output.resolve()}")


DTYPES = ("float32", "bfloat16")


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _eval_stream(args: argparse.Namespace) -> None:
    from .eval.stream_quality import evaluate_stream
    from .generation import load_pipeline

    if args.save:
        check_writable(args.save)
    policies = {text: kv_policy(text) for text in args.kv}
    result = evaluate_stream(load_pipeline(args.model, args.device, _dtype(args.dtype)), policies, args.captions, args.frames, args.every,
                             args.steps, args.guidance, device=args.device, full_kv=not args.no_full_kv)
    _save_json(args.save, result)
    for name, row in result["policies"].items():
        curve = " ".join(f"{a['all']:.2f}" for a in row["accuracy"])
        print(f"{name:24s} all-attribute accuracy every {args.every} frames: {curve}")


def _stream_bench(args: argparse.Namespace) -> None:
    from .eval.stream_bench import run_stream_bench, write_report
    from .generation import load_pipeline

    if args.report_only:
        write_report(args.out)
    else:
        check_writable(args.out / "results.json")
        run_stream_bench(load_pipeline(args.model, args.device, _dtype(args.dtype)), args.out, args.context, tuple(args.budgets),
                         args.captions, args.frames, args.every, args.steps, args.guidance, args.device,
                         methods=args.methods, videos=not args.no_videos, full_kv=not args.no_full_kv)
    print((args.out / "table.md").read_text())
    print(f"wrote {args.out.resolve()}")


def method_range(text: str) -> list[slice]:
    """Comma-separated A:B (methods A to B-1, either end may be left out) or single method numbers."""
    ranges = []
    for part in text.split(","):
        start, sep, stop = part.partition(":")
        try:
            ranges.append(slice(int(start) if start else None, int(stop) if stop else None) if sep else
                          slice(int(part), int(part) + 1))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give A:B (methods A to B-1), A:, :B or N, separated by "
                                             "commas (e.g. 0:4,7)") from None
    return ranges


KV_FORMS = ("full, window:N, sinks:S:N (S sink frames of N held), deep-sink:N, participative:N, tempcache:N (merging), "
            "soft-prune:N (int4 and summaries), heavy-hitters:N (the tokens attended to most) or auto:M (ours, in the "
            "KV memory of M exact frames), optionally followed by ,last-step (commit a chunk's last step instead of "
            "re-encoding it) and ,int8 or ,int4 (all but the newest 4 frames; not for tempcache, soft-prune, "
            "heavy-hitters, auto)")


def kv_policy(text: str):
    """A KV policy from its command-line form (`KV_FORMS`)."""
    from . import kv

    spec, *options = text.split(",")
    name, *numbers = spec.split(":")
    try:
        values = [int(n) for n in numbers]
        unknown = set(options) - {"last-step", "int8", "int4"}
        if unknown or ("int8" in options and "int4" in options):
            raise ValueError
        common = {"commit": "last_step" if "last-step" in options else "reencode",
                  "quant": next((kv.KVQuant(bits=int(o[3:])) for o in options if o.startswith("int")), None)}
        config = {("full", 0): lambda: kv.FullKV(**common),
                  ("window", 1): lambda: kv.SlidingWindow(frames=values[0], **common),
                  ("sinks", 2): lambda: kv.Sinks(sink_frames=values[0], frames=values[1], **common),
                  ("deep-sink", 1): lambda: kv.DeepSink(frames=values[0], **common),
                  ("participative", 1): lambda: kv.Participative(frames=values[0], **common),
                  ("tempcache", 1): lambda: kv.TempCache(frames=values[0], **common),
                  ("soft-prune", 1): lambda: kv.SoftPrune(frames=values[0], kept_frames=max(0, min(8, values[0] - 4)),
                                                          **common),
                  ("heavy-hitters", 1): lambda: kv.HeavyHitters(frames=values[0], **common),
                  ("auto", 1): lambda: kv.Auto(memory_frames=values[0], **common)}[(name, len(values))]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r}: give {KV_FORMS}") from None
    return config()


def check_writable(path: Path) -> None:
    """Refuse, before any compute, an output file that could not be written."""
    folder = path.parent.resolve()
    while not folder.exists():
        folder = folder.parent
    if path.is_dir():
        raise ValueError(f"output {str(path)!r} is a folder; give a file name")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {str(path)!r}: {str(folder)!r} is not a writable folder")


def _save_json(path: Path | None, result: dict) -> None:
    """Write `result` as JSON to `path` (a --save argument), if one was given."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


def _eval_reference(args: argparse.Namespace) -> None:
    from .eval.reference_eval import evaluate_reference, format_table

    if args.save:
        check_writable(args.save)
    from .eval.edit_quality import evaluate_editor
    from .reference.models import get_spec

    editors = [name for name in args.model if get_spec(name).task == "edit"]
    results = {name: evaluate_reference(name, args.captions, args.steps, args.guidance, args.device, args.batch_size,
                                        samples_per_caption=args.samples_per_caption, num_frames=args.frames)
               for name in args.model if name not in editors}
    edited = {name: evaluate_editor(name, args.edits, args.steps, args.guidance, args.device) for name in editors}
    _save_json(args.save, {**results, **edited})
    if args.json:
        print(json.dumps({**results, **edited}, indent=2))
        return
    if results:
        print(format_table(results))
    for name, evaluation in edited.items():
        print(f"{name}, {evaluation['edits']} held-out edits:")
        for kind, q in evaluation["quality"].items():
            print(f"  {kind}: changed {q['changed']:.3f}, kept {q['kept']:.3f}, both {q['success']:.3f}, "
                  f"PSNR outside the mask {q['psnr_outside_median']:.1f} dB (median)")


def _eval_evaluator(args: argparse.Namespace) -> None:
    from .eval.reference_eval import evaluate_evaluator

    print(json.dumps(evaluate_evaluator(args.clips, device=args.device, num_frames=args.frames), indent=2))


def _train_reference(args: argparse.Namespace) -> None:
    from .reference.train import train_reference

    state = train_reference(args.model, args.out, args.minutes, args.batch_size, args.lr, args.device,
                            args.resume, args.checkpoint_dir, args.seed, args.workers, compile=args.compile,
                            frames=args.frames)
    print(f"{args.model}: {state['steps']} steps, {state['seconds'] / 60:.1f} min in all; weights in {args.out}")


def _train_evaluator(args: argparse.Namespace) -> None:
    from .eval.evaluator import train_evaluator

    state = train_evaluator(args.out, args.minutes, args.device, args.batch_size, seed=args.seed, workers=args.workers,
                            endless=args.endless)
    print(f"evaluator: {state['steps']} steps; weights in {args.out}")


def _train_vqa(args: argparse.Namespace) -> None:
    from .reference.train_vqa import TRAIN_FRAMES, train_vqa

    state = train_vqa(args.out, args.minutes, args.batch_size, args.lr, args.device, args.resume, args.checkpoint_dir,
                      args.seed, args.workers, tuple(args.frames or TRAIN_FRAMES), args.questions)
    print(f"shapes-vqa: {state['steps']} steps, {state['seconds'] / 60:.1f} min in all; weights in {args.out}")


def _eval_vqa(args: argparse.Namespace) -> None:
    from .reference import vqa
    from .reference.train_vqa import evaluate_vqa

    if args.save:
        check_writable(args.save)
    model = vqa.load(args.weights)
    result = evaluate_vqa(model, args.streams, args.frames, device=args.device)
    _save_json(args.save, result)
    for key, accuracy in result["accuracy"].items():
        print(f"{key:32s} {accuracy:.3f}  ({result['questions'][key]} questions)")


def _watch_bench(args: argparse.Namespace) -> None:
    from .eval.watch_bench import run_watch_bench
    from .reference import vqa

    check_writable(args.out / "results.json")
    model = vqa.load(args.weights, args.device)
    result = run_watch_bench(model, args.out, args.streams, args.frames, args.questions, tuple(args.budgets),
                             args.chunk_frames)
    print((args.out / "table.md").read_text())
    print(f"{len(result['memories'])} memories; results in {args.out}")


def _calibrate(args: argparse.Namespace) -> None:
    import numpy as np

    from .generation import load_pipeline
    from .quant import W8A8, calibrate_quant, quantize
    from .reference import shapesworld
    from .reference.edits import sample_edit_batch
    from .reference.models import get_spec
    from .step_cache import calibrate

    if args.regione:
        _fit_regione_gamma(args)
        return
    if args.quant_predictor and args.quantized:
        raise ValueError("--quant-predictor fits the quantization predictor on the full-precision model; "
                         "--quantized profiles the step cache on a quantized one: give one of them")
    spec = get_spec(args.model)
    rng = np.random.default_rng(args.seed)
    images = None
    if spec.task == "edit":  # training edits: their instructions, and the images they edit
        batch = sample_edit_batch(rng, args.prompts, "train", spec.size)
        prompts, images = batch.instructions(), batch.sources
    else:
        prompts = [shapesworld.sample_scene(rng, "train", spec.is_video).caption(spec.is_video) for _ in range(args.prompts)]
    settings = dict(num_inference_steps=spec.default_steps if args.steps is None else args.steps,
                    guidance_scale=spec.default_guidance if args.guidance is None else args.guidance)
    kind = args.quant_predictor or f"{settings['num_inference_steps']}steps"
    out = args.out or Path(f"{args.model}-{kind}.json")
    check_writable(out)
    pipe = load_pipeline(args.model, args.device)
    pipe.check_inputs(prompts, settings["num_inference_steps"], settings["guidance_scale"], spec.num_frames, spec.size,
                      spec.size, images)
    run = lambda p, batch: p(batch, seed=args.seed, image=images, **settings)  # noqa: E731
    if args.quant_predictor:
        quant_profile = calibrate_quant(pipe, [prompts], run=run, format=args.quant_predictor)
        print(f"wrote {quant_profile.save(out)} ({len(quant_profile.layers)} layers, {args.quant_predictor})")
        return
    if args.quantized:
        quantize(pipe, W8A8(args.quantized))
    profile = calibrate(pipe, [prompts], run=run, segments=args.segments,
                        auto_budgets=tuple(args.auto_budgets), refine_runs=args.refine_runs)
    print(f"wrote {profile.save(out)} ({profile.num_steps} steps, segments at blocks {profile.edges}; "
          f"TeaCache coefficients {[round(c, 4) for c in profile.teacache_coefficients]})")


def _fit_regione_gamma(args: argparse.Namespace) -> None:
    from .generation import load_pipeline
    from .reference.models import get_spec
    from .region import fit_gamma

    spec = get_spec(args.model)
    if spec.task != "edit":
        raise ValueError(f"--regione fits RegionE's velocity decay on an editor's calibration edits; {args.model} is "
                         f"not an editor")
    steps = spec.default_steps if args.steps is None else args.steps
    out = args.out or Path(f"{args.model}-{steps}steps-regione.json")
    check_writable(out)
    gamma = fit_gamma(load_pipeline(args.model, args.device), args.prompts, steps, args.seed)
    out.write_text(json.dumps({"model": args.model, "steps": steps, "edits": args.prompts, "seed": args.seed,
                               "gamma": gamma}, indent=1))
    print(f"wrote {out}: gamma {[round(g, 4) for g in gamma]}")


def _cache_quality(args: argparse.Namespace) -> None:
    from .eval.cache_quality import auto_comparison, cache_quality, format_frontier, format_table

    if args.save:
        check_writable(args.save)
    result = cache_quality(args.model, args.captions, args.steps, args.guidance, args.device, args.batch_size, args.seed, args.policies)
    result["auto_comparison"] = comparison = auto_comparison(result)
    _save_json(args.save, result)
    print(format_table(result))
    print("\nBest PSNR (dB) per compute cap, with the compute spent:\n" + format_frontier(result))
    print("Auto is the most faithful policy at its compute" if not comparison["losses"]
          else "Auto is matched or beaten at its compute by:\n  " + "\n  ".join(comparison["losses"]))
    if comparison["out_of_reach"]:
        print("Cannot run as cheaply as Auto:\n  " + "\n  ".join(comparison["out_of_reach"]))


def _quant_quality(args: argparse.Namespace) -> None:
    from .eval.quant_quality import format_table, quant_quality

    if args.save:
        check_writable(args.save)
    result = quant_quality(args.model, args.captions, args.device, args.batch_size, args.seed, args.format, args.cache_profile,
                           args.steps)
    _save_json(args.save, result)
    print(format_table(result))


def _bench(args: argparse.Namespace) -> None:
    from .bench import groups, read_prompts, run_bench, verdict, write_report
    from .bench.report import format_table

    if args.list:
        for group in groups():
            print(f"{group.key:40s} {group.family}" + (f"  ({group.missing()})" if group.missing() else ""))
        return
    prompts = read_prompts(args.prompts) if args.prompts else None
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"output folder {str(args.out)!r} is a file")
    result = run_bench(args.model, args.device, args.steps, args.guidance, prompts, args.captions, args.seeds,
                       args.methods, args.frames, args.batch_size, args.repeats, args.sample_clips, tuple(args.edit_kinds),
                       args.timed_batches, progress=lambda partial: write_report(partial, args.out))
    paths = write_report(result, args.out)
    print(format_table({k: v for k, v in result.items() if k != "samples"}))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    print(verdict(result))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def budget(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a budget is a fraction of block compute in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .reference.edits import KINDS
    from .reference.models import IN_TRAINING, SPECS
    from .step_cache.planner import BUDGETS as AUTO_BUDGETS

    parser = argparse.ArgumentParser(prog="tempocache", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate clips from captions with a shipped model")
    p.add_argument("prompts", nargs="+", help='captions, e.g. "a red circle moves left on a black background"')
    p.add_argument("-o", "--output", type=Path, default=Path("out.gif"), help="a .gif or .png file")
    p.add_argument("--model", default="shapes-t2v", help=f"one of: {', '.join(SPECS)}")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--frames", type=positive_int, default=None, help="frames per clip (video models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--scale", type=positive_int, default=4, help="upscale factor for the saved file")
    p.set_defaults(run=_generate)

    p = sub.add_parser("edit", help="edit an image with an instruction, with the reference editor")
    p.add_argument("image", type=Path, help="the image to edit (a 32x32 RGB PNG for shapes-edit)")
    p.add_argument("instruction", help='e.g. "make the red square blue"')
    p.add_argument("-o", "--output", type=Path, default=Path("edited.png"), help="a .png file")
    p.add_argument("--model", default="shapes-edit")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--scale", type=positive_int, default=1, help="upscale factor for the saved file")
    p.set_defaults(run=_edit)

    p = sub.add_parser("stream", help="stream a video from a chunk-autoregressive model, written to MP4 as it is made")
    p.add_argument("prompt", help='a caption, e.g. "a red circle moves right on a black background"')
    p.add_argument("-o", "--output", type=Path, default=Path("stream.mp4"), help="an .mp4 file (playable if interrupted)")
    p.add_argument("--frames", type=positive_int, default=None, help="frames to make (default: until interrupted)")
    p.add_argument("--model", default="shapes-ar")
    p.add_argument("--kv", type=kv_policy, default="window:28", help=f"KV cache: {KV_FORMS}; default window:28")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps per chunk (default: the model's)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--scale", type=positive_int, default=4, help="upscale factor for the saved file")
    p.set_defaults(run=_stream)

    p = sub.add_parser("eval-stream", help="a streaming model's drift curve: accuracy every N frames of long rollouts")
    p.add_argument("--model", default="shapes-ar")
    p.add_argument("--kv", nargs="*", default=["window:16"], help="KV policies beside full KV (see `stream --kv`)")
    p.add_argument("--captions", type=positive_int, default=64)
    p.add_argument("--frames", type=positive_int, default=512)
    p.add_argument("--every", type=positive_int, default=32, help="frames between the windows read")
    p.add_argument("--no-full-kv", action="store_true", help="leave out full KV (its memory grows with length)")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and activations (bfloat16: flash attention on a GPU, several times faster)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--save", type=Path, default=None, help="also write the JSON to this file")
    p.set_defaults(run=_eval_stream)

    p = sub.add_parser("stream-bench", help="every KV policy and the no-cache baseline side by side on a streaming model")
    p.add_argument("--model", default="shapes-ar")
    p.add_argument("--out", type=Path, default=Path("stream-bench"), help="folder for the results")
    p.add_argument("--context", type=positive_int, default=28, help="the most frames a method holds")
    p.add_argument("--budgets", type=positive_int, nargs=2, default=[8, 16],
                   help="the two KV memory budgets, in exact frames, the bounded methods run at")
    p.add_argument("--methods", type=method_range, default=[slice(None)],
                   help="only these methods of the list: A:B (A to B-1, either end may be left out), or N, separated by "
                        "commas (default: all); full KV always, unless --no-full-kv")
    p.add_argument("--no-full-kv", action="store_true",
                   help="leave full KV out (the longest to run), and with it the PSNR against it")
    p.add_argument("--no-videos", action="store_true", help="leave out the videos and index.html (no imageio-ffmpeg)")
    p.add_argument("--report-only", action="store_true",
                   help="only write the table, plots, videos and index.html from the results in --out")
    p.add_argument("--captions", type=positive_int, default=16)
    p.add_argument("--frames", type=positive_int, default=512)
    p.add_argument("--every", type=positive_int, default=32, help="frames between the windows read")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and activations (bfloat16: flash attention on a GPU, several times faster)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=_stream_bench)

    p = sub.add_parser("eval-reference", help="semantic accuracy and Fréchet distance on held-out captions, full compute "
                       "(an editor: the edit judge on held-out edits)")
    p.add_argument("--model", nargs="+", default=list(SPECS), help=f"any of: {', '.join(SPECS)}")
    p.add_argument("--captions", type=positive_int, default=64, help="number of held-out captions")
    p.add_argument("--samples-per-caption", type=positive_int, default=1, help="seeds per caption (more steadies the Fréchet distance)")
    p.add_argument("--edits", type=positive_int, default=200, help="an editor's held-out edits, the kinds in turn")
    p.add_argument("--frames", type=positive_int, default=None, help="frames per clip (video models; default: the model's)")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--save", type=Path, default=None, help="also write the JSON to this file")
    p.set_defaults(run=_eval_reference)

    p = sub.add_parser("eval-evaluator", help="the evaluator's accuracy on real clips of held-out captions")
    p.add_argument("--clips", type=positive_int, default=2048)
    p.add_argument("--frames", type=positive_int, default=8, help="frames per clip")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=_eval_evaluator)

    p = sub.add_parser("train-reference", help="train a reference model with flow matching (GPU)")
    p.add_argument("--model", required=True, choices=[*SPECS, *IN_TRAINING])
    p.add_argument("--out", type=Path, required=True, help="folder for the fp16 weights and training.json")
    p.add_argument("--minutes", type=float, required=True, help="wall-clock budget for this run")
    p.add_argument("--resume", type=Path, default=None, help="folder written by an earlier run")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="keep a full checkpoint here for exact resume")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (falls back to eager)")
    p.add_argument("--frames", type=positive_int, nargs="+", default=None,
                   help="clip lengths a video model trains on, one per batch, drawn uniformly (default: its own)")
    p.set_defaults(run=_train_reference)

    p = sub.add_parser("train-vqa", help="train shapes-vqa, the streaming video-QA reference model (GPU)")
    p.add_argument("--out", type=Path, required=True, help="folder for the fp16 weights and training.json")
    p.add_argument("--minutes", type=float, required=True, help="wall-clock budget for this run")
    p.add_argument("--resume", type=Path, default=None, help="folder written by an earlier run")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="keep a full checkpoint here for exact resume")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="streams per step at the longest --frames (shorter ones: as many more as fill as many frames)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--frames", type=positive_int, nargs="+", default=None,
                   help="training streams' lengths, one per batch, drawn uniformly (default: from 64 to 512 frames)")
    p.add_argument("--questions", type=positive_int, default=32, help="questions per training stream")
    p.set_defaults(run=_train_vqa)

    p = sub.add_parser("eval-vqa", help="shapes-vqa's accuracy with full KV on held-out ShapesStream questions")
    p.add_argument("--weights", type=Path, default=None, help="a folder written by train-vqa (default: the shipped one)")
    p.add_argument("--streams", type=positive_int, default=32)
    p.add_argument("--frames", type=positive_int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--save", type=Path, default=None, help="a .json file for the result")
    p.set_defaults(run=_eval_vqa)

    p = sub.add_parser("watch-bench", help="every memory of tempocache.watch on the same held-out ShapesStream questions")
    p.add_argument("--weights", type=Path, default=None, help="a folder written by train-vqa (default: the shipped one)")
    p.add_argument("--out", type=Path, default=Path("watch-bench"), help="folder for results.json, table.md, memory.png")
    p.add_argument("--streams", type=positive_int, default=32)
    p.add_argument("--frames", type=positive_int, default=512)
    p.add_argument("--questions", type=positive_int, default=32, help="questions drawn per stream (before balancing)")
    p.add_argument("--budgets", type=positive_int, nargs="+", default=[16, 32, 64], help="device frames per bounded memory")
    p.add_argument("--chunk-frames", type=positive_int, default=4)
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=_watch_bench)

    p = sub.add_parser("calibrate", help="profile a shipped model at full compute (for Auto, TeaCache, ERTACache)")
    p.add_argument("--model", default="shapes-t2v", help=f"one of: {', '.join(SPECS)}")
    p.add_argument("--prompts", type=positive_int, default=16,
                   help="training captions (an editor: training edits) to profile on (Auto's refinement keeps what "
                        "helps both halves of them)")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--segments", type=positive_int, default=4, help="block ranges Auto decides on")
    p.add_argument("--auto-budgets", type=budget, nargs="*", default=list(AUTO_BUDGETS),
                   help="budgets at which Auto's planner variants are compared and refined closed-loop (none: skip)")
    p.add_argument("--refine-runs", type=non_negative_int, default=32, help="closed-loop runs per budget refining Auto's plan (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quant-predictor", choices=["fp8", "int8"], default=None,
                   help="instead: fit TimestepAdaptive's predictor for this format (default out: <model>-<format>.json)")
    p.add_argument("--quantized", choices=["fp8", "int8"], default=None,
                   help="profile the step cache on the model quantized W8A8 to this format (CacheQuant)")
    p.add_argument("--regione", action="store_true",
                   help="an editor: fit RegionE's velocity decay (gamma) on training edits instead of a profile")
    p.add_argument("--out", type=Path, default=None, help="profile JSON (default: <model>-<steps>steps.json)")
    p.set_defaults(run=_calibrate)

    p = sub.add_parser("quant-quality", help="W8A8, TimestepAdaptive and static mixed precision, alone and with Auto, "
                                             "against full precision on held-out captions")
    p.add_argument("--model", default="shapes-t2v", help=f"one of: {', '.join(SPECS)}")
    p.add_argument("--captions", type=positive_int, default=16)
    p.add_argument("--format", choices=["fp8", "int8"], default="fp8", help="TimestepAdaptive's 8-bit format")
    p.add_argument("--cache-profile", type=Path, default=None,
                   help="a step-cache profile made with calibrate --quantized FORMAT: also run W8A8 + Auto with it")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--save", type=Path, default=None, help="also write the JSON here")
    p.set_defaults(run=_quant_quality)

    p = sub.add_parser("cache-quality", help="every step-cache policy against full compute on held-out captions")
    p.add_argument("--model", default="shapes-t2v", help=f"one of: {', '.join(SPECS)}")
    p.add_argument("--captions", type=positive_int, default=16)
    p.add_argument("--policies", nargs="+", default=None, help="default: all")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--save", type=Path, default=None, help="also write the JSON here")
    p.set_defaults(run=_cache_quality)

    p = sub.add_parser("bench", help="tempocache's policies against the peers' and fewer steps, one run, one report")
    p.add_argument("--model", default="shapes-t2v", help=f"one of: {', '.join(SPECS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps of full compute (default: the model's)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--frames", type=positive_int, default=None, help="frames per clip (video models)")
    p.add_argument("--prompts", type=Path, default=None, help="a file of captions, one per line (default: held-out captions)")
    p.add_argument("--captions", type=positive_int, default=8,
                   help="how many held-out captions when no prompts file is given (an editor's: held-out edits)")
    p.add_argument("--edit-kinds", nargs="+", default=list(KINDS), choices=KINDS,
                   help="an editor's edits, the kinds in turn (e.g. the local ones, or background alone)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="each caption is sampled once per seed")
    p.add_argument("--methods", nargs="+", default=None,
                   help="method keys or families (tempocache, diffusers, cache-dit, fewer-steps); default: all; see --list")
    p.add_argument("--batch-size", type=positive_int, default=8, help="clips per pipeline call; the first batch is the one timed")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per setting (the median counts)")
    p.add_argument("--timed-batches", type=positive_int, default=1, help="batches each timed run makes (the first ones)")
    p.add_argument("--sample-clips", type=positive_int, default=2, help="clips per setting shown in index.html's GIFs")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for results.json, table.md, pareto.png, index.html")
    p.add_argument("--list", action="store_true", help="list the methods and whether their library is installed, then stop")
    p.set_defaults(run=_bench)

    p = sub.add_parser("train-evaluator", help="train the ShapesWorld attribute classifier")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--endless", action="store_true", help="on stretches of endless clips: the streaming model's evaluator")
    p.set_defaults(run=_train_evaluator)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["bench"]:
        for name in TORCHAO_IMPORT_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"tempocache {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
