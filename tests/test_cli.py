import re
import subprocess
import sys
from pathlib import Path

import pytest

from tempocache.cli import main

CAPTION = "a red circle moves left on a black background"


@pytest.mark.parametrize(
    "args, message",
    [
        ([CAPTION.replace("red", "purple")], "unknown word(s) 'purple'"),
        ([CAPTION.replace("red", "purple")], "the vocabulary is: a and background black"),
        ([CAPTION, "--model", "sdxl"], "unknown model 'sdxl'; the shipped models are: shapes-t2v, shapes-t2i"),
        ([CAPTION, "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
        ([CAPTION, "--frames", "0"], "argument --frames: must be a positive integer, got 0"),
        ([CAPTION, "--frames", "500"], "shapes-t2v makes 1 to 64 frames"),
        (["a red circle on a black background", "--model", "shapes-t2i", "--frames", "8"], "num_frames must be 1"),
        ([CAPTION, "--guidance", "0.5"], "guidance must be at least 1.0"),
        ([CAPTION, "-o", "clip.avi"], "must end in one of: .gif, .png"),
        ([CAPTION, "-o", "no/such/folder/clip.gif"], "does not exist"),
        (["red"], "must end with 'on a <colour> background'"),
        (["circle circle circle circle"], "must end with 'on a <colour> background'"),
        ([""], "must end with 'on a <colour> background'"),
        (["a red circle on a black background"], "give every shape a motion); e.g. 'a red circle stays still on"),
        (["a red circle grows on a black background", "--model", "shapes-t2i"], "shapes have no motion"),
    ],
)
def test_bad_input_is_refused_before_any_compute(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import tempocache.reference.pipeline as pipeline

    monkeypatch.setattr(pipeline, "predict_velocity", lambda *a: pytest.fail("sampling started"))
    assert exit_code(["generate", *args]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "nothing is written"


def exit_code(args: list[str]) -> int:
    """main's exit status, whether the command refused the input or argparse did."""
    try:
        return main(args)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("args, message", [
    (["calibrate", "--steps", "0"], "must be a positive integer, got 0"),
    (["calibrate", "--guidance", "0"], "guidance must be at least 1.0"),
    (["calibrate", "--auto-budgets", "1.5"], "a budget is a fraction of block compute in (0, 1], got 1.5"),
    (["calibrate", "--segments", "0"], "must be a positive integer, got 0"),
    (["calibrate", "--out", "a-file/profile.json"], "is not a writable folder"),
    (["calibrate", "--device", "banana"], "device 'banana' is not a torch device"),
    (["cache-quality", "--captions", "0"], "must be a positive integer, got 0"),
    (["cache-quality", "--save", "a-file/quality.json"], "is not a writable folder"),
    (["bench", "--repeats", "0"], "must be a positive integer, got 0"),
    (["generate", CAPTION, "-o", "a-folder"], "is a folder"),
    (["generate", CAPTION, "--device", "cuda:7"], "cuda:7"),
])
def test_bad_arguments_of_every_command_are_refused_before_any_compute(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder.gif").mkdir()
    args = [a.replace("a-folder", "a-folder.gif") for a in args]
    import tempocache.reference.pipeline as pipeline

    monkeypatch.setattr(pipeline, "predict_velocity", lambda *a: pytest.fail("sampling started"))
    assert exit_code(args) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder.gif"], "nothing is written"


def test_generate_writes_a_gif_and_a_png(tmp_path, capsys):
    gif, png = tmp_path / "clip.gif", tmp_path / "grid.png"
    assert main(["generate", CAPTION, "a blue square grows on a white background", "--steps", "2", "-o", str(gif)]) == 0
    assert f"wrote {gif}" in capsys.readouterr().out
    import imageio.v3 as iio

    frames = iio.imread(gif)
    assert frames.shape[0] == 8 and frames.shape[1] == 4 * 34 and frames.shape[2] == 2 * 4 * 34
    assert main(["generate", "a red circle on a black background", "--model", "shapes-t2i", "--steps", "2", "-o", str(png)]) == 0
    assert iio.imread(png).shape[:2] == (4 * 34, 4 * 34)


def test_console_script_is_installed_and_quiet(tmp_path):
    script = Path(sys.executable).parent / "tempocache"
    help_run = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    for command in ["generate", "eval-reference", "train-reference", "train-evaluator"]:
        assert command in help_run.stdout
    out = tmp_path / "clip.gif"
    generate_run = subprocess.run([str(script), "generate", CAPTION, "--steps", "1", "-o", "clip.gif"], cwd=tmp_path,
                                  capture_output=True, text=True, check=True)
    assert generate_run.stdout.strip() == f"wrote {out.resolve()}"  # the absolute path of what it wrote
    for run in (help_run, generate_run):  # nothing from torchao, which these commands do not use
        noise = [line for line in run.stderr.splitlines() if re.search(r"torchao|_pytree|warn", line, re.IGNORECASE)]
        assert not noise, noise


def test_quantization_predictor_and_quality_from_the_command_line(tmp_path, capsys):
    import json

    import tempocache

    profile = tmp_path / "t2i-int8.json"
    assert main(["calibrate", "--model", "shapes-t2i", "--prompts", "1", "--steps", "3", "--quant-predictor", "int8",
                 "--out", str(profile)]) == 0
    fitted = tempocache.QuantProfile.load(profile)
    assert fitted.format == "int8" and len(fitted.step_timesteps) == 3 and len(fitted.layers) == 66
    assert main(["calibrate", "--quant-predictor", "fp8", "--quantized", "fp8"]) == 2
    assert "give one of them" in capsys.readouterr().err

    saved = tmp_path / "quality.json"
    assert main(["quant-quality", "--model", "shapes-t2i", "--captions", "1", "--steps", "4", "--save", str(saved)]) == 0
    rows = json.loads(saved.read_text())["rows"]
    assert rows[0]["quantization"] == "full precision" and rows[0]["psnr"] == 100
    assert all(20 < r["psnr"] < 100 for r in rows[1:])
    assert all(r["weight_bytes_ratio"] > 3.9 for r in rows if r["quantization"] != "full precision")
    assert {r["step_cache"] for r in rows} == {"none", "Auto(budget=0.33) zero-shot"}
    assert "| TimestepAdaptive fp8 budget=0.7 | none |" in capsys.readouterr().out
