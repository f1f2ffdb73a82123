import json

import numpy as np
import pytest

import tempocache.bench.methods as methods
from tempocache.bench import read_prompts, verdict
from tempocache.bench.methods import Group, Setting, select
from tempocache.cli import main
from tempocache.generation import load_pipeline

T2I_CAPTIONS = ["a red circle on a black background", "a blue square and a green triangle on a white background"]


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError) as error:
        select(["tempocache.Auto", "teacache", "diffusers"])
    message = str(error.value)
    assert "unknown method 'teacache'" in message
    for key in ["tempocache.TeaCache", "diffusers.MagCache", "cache-dit.DBCache-F8B0", "fewer-steps"]:
        assert key in message


def test_methods_select_by_family_and_key():
    chosen = [g.key for g in select(["cache-dit", "tempocache.Auto"])]
    assert chosen == ["tempocache.Auto", "cache-dit.DBCache-F1B0", "cache-dit.DBCache-F8B0", "cache-dit.DBCache+TaylorSeer"]


@pytest.mark.parametrize("text, message", [
    ("", "has no captions"),
    ("\n  \n", "has no captions"),
    ("a red circle on a black background\na purple circle on a black background\n", ":2: unknown colour 'purple'; colours are red"),
])
def test_bad_prompts_files(tmp_path, text, message):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        read_prompts(path)
    assert message in str(error.value)


def test_unreadable_prompts_file_is_refused_before_any_compute(tmp_path, capsys, monkeypatch):
    import tempocache.bench.runner as runner

    monkeypatch.setattr(runner, "load_pipeline", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00")
    for path, message in [(tmp_path / "missing.txt", "cannot read prompts file"), (tmp_path / "binary.txt", "cannot read prompts file")]:
        assert main(["bench", "--prompts", str(path), "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert main(["bench", "--methods", "nonsense", "--out", str(tmp_path / "out")]) == 2
    assert "unknown method 'nonsense'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _broken(pipe, steps, guidance):
    def enable(p):
        raise RuntimeError("this method broke")
    return [Setting("Broken()", "diffusers", {}, enable=enable)]


def test_a_small_bench_run_end_to_end(tmp_path, capsys, monkeypatch):
    known = methods.groups()
    extra = [Group("diffusers.Broken", "diffusers", build=_broken),
             Group("cache-dit.Absent", "cache-dit", requires="no_such_peer_library", build=_broken)]
    monkeypatch.setattr(methods, "groups", lambda: known + extra)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(T2I_CAPTIONS) + "\n")
    out = tmp_path / "report"
    args = ["bench", "--model", "shapes-t2i", "--steps", "4", "--prompts", str(prompts), "--batch-size", "2", "--repeats", "1",
            "--out", str(out), "--methods", "fewer-steps", "tempocache.StaticCache", "tempocache.Auto",
            "diffusers.FirstBlockCache", "diffusers.Broken", "cache-dit.DBCache-F1B0", "cache-dit.Absent"]
    assert main(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("verdict (shapes-t2i, cpu")
    assert any(line.startswith("full compute's semantic accuracy: ") for line in printed)

    result = json.loads((out / "results.json").read_text())
    for name in ["table.md", "pareto.png", "index.html"]:
        assert (out / name).stat().st_size > 0
    rows = {(r["method"], r["setting"]): r for r in result["rows"]}
    full = rows[("full", "full compute")]
    assert full["speedup"] == 1 and full["compute_fraction"] == 1 and full["psnr"] == 100
    assert rows[("fewer-steps", "2 steps")]["compute_fraction"] == pytest.approx(0.5)
    assert rows[("fewer-steps", "2 steps")]["psnr"] < 60
    static = [r for r in result["rows"] if r["method"] == "tempocache.StaticCache"]
    assert len(static) >= 3 and all(r["status"] == "ok" for r in static)
    for r in static:  # the bench's count of linear multiply-adds agrees with the engine's own count
        assert r["compute_fraction"] == pytest.approx(r["library_compute_fraction"], abs=0.02)
    assert rows[("diffusers.Broken", "Broken()")]["status"] == "failed: RuntimeError: this method broke"
    assert rows[("cache-dit.Absent", None)]["status"] == ("not run: no_such_peer_library is not installed "
                                                          "(pip install 'tempocache[peers]')")
    assert all(r["status"] == "ok" for r in result["rows"] if r["method"].startswith(("diffusers.First", "cache-dit.DB")))
    for r in result["rows"]:
        if r["status"] == "ok":
            assert set(r["semantic_accuracy"]) >= {"all", "colour", "shape"} and r["frechet_distance"] > 0
    html = (out / "index.html").read_text()
    assert html.count("<img class=clip src='gifs/") == 2 * sum(r["status"] == "ok" for r in result["rows"])
    assert "failed: RuntimeError" in (out / "table.md").read_text()
    assert verdict(result) == printed[-1]


def test_a_bench_cut_short_keeps_the_settings_it_finished(tmp_path, monkeypatch):
    import tempocache.bench.runner as runner

    measure, calls = runner.measure, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a device call's time limit, or Ctrl-C
        return measure(*args, **kwargs)

    monkeypatch.setattr(runner, "measure", interrupted)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(T2I_CAPTIONS[0] + "\n")
    out = tmp_path / "report"
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--model", "shapes-t2i", "--steps", "4", "--prompts", str(prompts), "--batch-size", "1",
              "--repeats", "1", "--out", str(out), "--methods", "fewer-steps"])
    result = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in result["rows"]] == ["full compute", "3 steps"]
    assert "3 steps" in (out / "table.md").read_text() and (out / "index.html").stat().st_size > 0


def _peer_row(psnr, speedup, family="diffusers"):
    return {"method": f"{family}.X", "family": family, "setting": f"X({speedup})", "status": "ok", "psnr": psnr, "speedup": speedup}


def test_verdict_and_domination():
    from tempocache.bench.report import undominated_peers

    rows = [_peer_row(100, 1.0, "full compute"), _peer_row(33, 2.95, "tempocache"), _peer_row(40, 2.0, "tempocache"),
            _peer_row(30, 3.0), _peer_row(45, 1.5), _peer_row(25, 2.8, "cache-dit")]
    result = {"model": "m", "device": "d", "rows": rows}
    assert verdict(result) == ("verdict (m, d): near 3x speedup tempocache 33.0 dB (X(2.95), 2.95x) vs best peer 30.0 dB "
                               "(X(3.0), 3.00x): +3.0 dB; at PSNR >= 30 dB tempocache 2.95x vs best peer 3.00x (X(3.0)): 0.98x")
    # 30 dB at 3.0x is matched by 33 dB at 2.95x (within 3%); 45 dB at 1.5x is not matched by anything of ours
    assert [r["setting"] for r in undominated_peers(result)] == ["X(1.5)"]


def test_zero_shot_auto_is_compared_with_each_method_at_its_own_compute():
    from tempocache.bench.report import format_zero_shot, zero_shot_comparison

    def row(method, compute, psnr, family="diffusers"):
        return {"method": method, "family": family, "setting": f"{method}({compute})", "status": "ok",
                "compute_fraction": compute, "psnr": psnr, "speedup": 1 / compute}

    rows = [row("full", 1.0, 100, "full compute"), row("tempocache.Auto-zero-shot", 0.3, 31.0, "tempocache"),
            row("tempocache.Auto", 0.25, 30.0, "tempocache"), row("tempocache.Auto", 0.35, 36.0, "tempocache"),
            row("diffusers.FirstBlockCache", 0.2, 20.0), row("diffusers.FirstBlockCache", 0.4, 30.0),
            row("cache-dit.DBCache-F1B0", 0.45, 40.0, "cache-dit"), row("diffusers.MagCache", 0.3, 35.0)]
    (comparison,) = zero_shot_comparison({"rows": rows})
    assert comparison["rivals"] == {"tempocache.Auto": pytest.approx(33.0), "diffusers.FirstBlockCache": pytest.approx(25.0),
                                    "cache-dit.DBCache-F1B0": None}  # MagCache needs a calibration: not a rival here
    assert comparison["beats_uncalibrated_peers"]
    assert "above every uncalibrated peer" in format_zero_shot([comparison])
    rows[-3] = row("diffusers.FirstBlockCache", 0.4, 50.0)  # 35 dB at 0.3: above zero-shot's 31
    assert not zero_shot_comparison({"rows": rows})[0]["beats_uncalibrated_peers"]


def test_full_compute_below_the_reference_bars_is_flagged():
    from tempocache.bench.report import full_compute_accuracy

    full = {"family": "full compute", "semantic_accuracy": {"colour": 0.98, "shape": 0.93, "motion": 0.38, "all": 0.35}}
    line = full_compute_accuracy({"rows": [full], "frames": 16})
    assert line.startswith("full compute's semantic accuracy: colour 0.98, shape 0.93, motion 0.38, all 0.35")
    assert "WARNING: at 16 frame(s) full compute is below the reference bars (motion 0.38 < 0.75)" in line
    full["semantic_accuracy"]["motion"] = 0.9
    assert "WARNING" not in full_compute_accuracy({"rows": [full], "frames": 8})


def test_both_cfg_branches_in_one_call_match_separate_calls():
    pipe = load_pipeline("shapes-t2v", "cpu")
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, num_frames=2, seed=[1, 2])
    captions = ["a red circle moves left on a black background", "a blue square grows on a white background"]
    separate = pipe(captions, **kwargs).frames
    together = pipe(captions, batch_cfg=True, **kwargs).frames
    assert np.abs(separate.astype(int) - together.astype(int)).max() <= 2


def test_cache_dit_setting_leaves_no_state_between_generations():
    pipe = load_pipeline("shapes-t2i", "cpu")
    pipe.set_progress_bar_config(disable=True)
    (setting,) = [s for s in select(["cache-dit.DBCache-F1B0"])[0].build(pipe, 10, 2.0)
                  if s.settings["residual_diff_threshold"] == 0.64]

    def generate(seed):
        setting.before_generation(pipe)
        return pipe(T2I_CAPTIONS, num_inference_steps=10, seed=seed).frames

    setting.enable(pipe)
    try:
        first, _, again = generate(3), generate(4), generate(3)  # another generation between
    finally:
        setting.disable(pipe)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, pipe(T2I_CAPTIONS, num_inference_steps=10, seed=3).frames), "the cache did skip work"


def test_quantized_settings_run_on_a_copy_and_leave_the_pipeline_as_it_was():
    pipe = load_pipeline("shapes-t2i", "cpu")
    pipe.set_progress_bar_config(disable=True)
    original = pipe.transformer
    before = pipe(T2I_CAPTIONS, num_inference_steps=4, seed=0).frames
    settings = [s for key in ("tempocache.W8A8", "torchao.Int8DynamicActivation") for s in select([key])[0].build(pipe, 4, 2.0)]
    assert [s.family for s in settings] == ["tempocache"] * 3 + ["torchao"]
    assert [s.name for s in settings[:3]] == ["W8A8(format=fp8)", "W8A8(format=int8)", "W8A8(format=fp8, attention=True)"]
    outputs = []
    for setting in settings:
        setting.enable(pipe)
        try:
            assert pipe.transformer is not original
            outputs.append(pipe(T2I_CAPTIONS, num_inference_steps=4, seed=0).frames)
        finally:
            setting.disable(pipe)
        assert pipe.transformer is original
    assert all(not np.array_equal(out, before) and np.abs(out - before).mean() < 0.005 for out in outputs)  # quantized, slightly
    assert np.array_equal(pipe(T2I_CAPTIONS, num_inference_steps=4, seed=0).frames, before)
    with pytest.raises(ValueError, match="compute capability 8.9"):
        select(["torchao.Float8DynamicActivation"])[0].build(pipe, 4, 2.0)


def test_settings_that_cannot_run_at_the_step_count_are_said_before_any_sampling(monkeypatch):
    import tempocache.reference.pipeline as pipeline

    monkeypatch.setattr(pipeline, "predict_velocity", lambda *a: pytest.fail("sampling started"))
    pipe = load_pipeline("shapes-t2i")
    (calibrated,) = select(["tempocache.Auto"])
    refused = calibrated.build(pipe, 4, 2.0)  # the shipped profile is for 20 steps
    assert refused and all(isinstance(r, str) and "made for 20 steps, this generation has 4" in r for r in refused)
    (zero_shot,) = select(["tempocache.Auto-zero-shot"])
    assert not any(isinstance(s, str) for s in zero_shot.build(pipe, 4, 2.0))  # planned for 4 steps


def test_an_editor_bench_judges_edits_and_scores_regione_partitions(tmp_path, capsys, monkeypatch):
    import tempocache.bench.runner as runner
    from test_editing import tiny_editor

    monkeypatch.setattr(runner, "load_pipeline", lambda *a: tiny_editor())
    out = tmp_path / "report"
    assert main(["bench", "--model", "shapes-edit", "--steps", "12", "--captions", "4", "--edit-kinds", "recolour",
                 "background", "--batch-size", "2", "--repeats", "1", "--out", str(out), "--methods", "fewer-steps",
                 "tempocache.RegionE", "tempocache.StaticCache", "diffusers.FirstBlockCache", "diffusers.MagCache",
                 "cache-dit.DBCache-F1B0"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("verdict (shapes-edit, cpu") and "RegionE" in printed[-1]
    result = json.loads((out / "results.json").read_text())
    assert result["edits"] == 4 and result["edit_kinds"] == ["recolour", "background"]
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    assert {r["method"] for r in rows} >= {"full", "fewer-steps", "tempocache.RegionE", "tempocache.StaticCache",
                                           "diffusers.FirstBlockCache", "diffusers.MagCache", "cache-dit.DBCache-F1B0"}
    for r in rows:
        quality = r["edit_quality"]
        assert set(quality) == {"recolour", "background", "local"} and quality["recolour"]["edits"] == 2
        assert all(0 <= q["changed"] <= 1 and 0 <= q["kept"] <= 1 for q in quality.values())
    regione = [r for r in rows if r["method"] == "tempocache.RegionE"]
    assert len(regione) == len(methods.REGION_SETTINGS)
    for r in regione:  # an untrained editor: every token reads as edited, so each edit runs in full
        assert 0 <= r["edit_quality"]["local"]["partition_recall"] <= 1
        assert r["library_compute_fraction"] <= 1
    assert "edit success | partition recall" in (out / "table.md").read_text()
