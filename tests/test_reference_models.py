"""The shipped weights: load offline, reproduce recorded outputs, stay small.

Recorded outputs come from `python tests/test_reference_models.py` (run it again after retraining).
"""

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tempocache.eval.metrics import below_bars
from tempocache.reference.card import _clip_lengths, _quality_lines
from tempocache.reference.models import SPECS, edit_velocity, get_spec, load_weights, make_tokenizer, predict_velocity

RECORDED = Path(__file__).parent / "data" / "reference_outputs.safetensors"
RESULTS = Path(__file__).parents[1] / "benchmarks" / "results"
CAPTION = {"shapes-t2v": "a green triangle moves up on a gray background", "shapes-t2i": "a green triangle on a gray background",
           "shapes-edit": "make the green triangle red"}
GENERATORS = [name for name in SPECS if get_spec(name).task == "generate"]


def fixed_output(name: str) -> torch.Tensor:
    spec = get_spec(name)
    transformer, text_encoder = load_weights(spec.directory, spec)
    x, reference = (torch.randn(1, 3, spec.num_frames, spec.size, spec.size, generator=torch.Generator().manual_seed(seed))
                    for seed in (0, 1))
    text = text_encoder(make_tokenizer(spec)([CAPTION[name]]))
    with torch.no_grad():
        if spec.task == "edit":
            return edit_velocity(transformer, x, reference, torch.tensor([0.6]), text)
        return predict_velocity(transformer, x, torch.tensor([0.6]), text)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", SPECS)
def test_shipped_weights_load_offline_and_reproduce_recorded_outputs(name, no_network):
    expected = load_file(RECORDED)[name]
    torch.testing.assert_close(fixed_output(name), expected, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name", SPECS)
def test_shipped_files_are_small_and_complete(name):
    directory = get_spec(name).directory
    weights = sum(p.stat().st_size for p in directory.rglob("*.safetensors"))
    assert 1e6 < weights < 40e6
    for part in ["README.md", "loss.png", "samples.png", "training.json", "scheduler/scheduler_config.json"]:
        assert (directory / part).is_file(), f"{name} is missing {part}"


def test_committed_evaluations_meet_the_bars_at_every_clip_length():
    evaluations = [*json.loads((RESULTS / "reference_eval.json").read_text()).values()]
    evaluations += [e for path in RESULTS.glob("reference_eval_*frames.json") for e in json.loads(path.read_text()).values()]
    assert {e["model"] for e in evaluations} == set(GENERATORS)
    assert {e["frames"] for e in evaluations if e["model"] == "shapes-t2v"} >= {8, 16}
    for e in evaluations:
        assert e["captions"] >= 64 and not below_bars(e["semantic_accuracy"]), (e["model"], e.get("frames"))


def test_the_committed_editor_evaluation_meets_the_editor_bars():
    from tempocache.eval.edit_quality import BARS

    for name in set(SPECS) - set(GENERATORS):
        evaluation = json.loads((RESULTS / f"reference_eval_{name}.json").read_text())[name]
        assert evaluation["edits"] >= 200 and set(evaluation["quality"]) >= {"recolour", "remove", "add", "move",
                                                                             "background", "local"}
        for kind, quality in evaluation["quality"].items():
            assert all(quality[m] >= bar for m, bar in BARS.items()), (name, kind, quality)


def test_a_profile_belongs_to_one_set_of_weights_whatever_its_dtype():
    from tempocache.models import fingerprint

    generator, editor = (load_weights(get_spec(n).directory, get_spec(n))[0] for n in ("shapes-t2i", "shapes-edit"))
    public = [{k: v for k, v in m.config.items() if not k.startswith("_")} for m in (generator, editor)]
    assert public[0] == public[1] and fingerprint(generator) != fingerprint(editor)
    assert fingerprint(generator.to(torch.bfloat16)) == fingerprint(load_weights(get_spec("shapes-t2i").directory,
                                                                                 get_spec("shapes-t2i"))[0])


def test_card_lists_every_clip_length_trained_and_evaluated():
    spec = get_spec("shapes-t2v")
    state = {"sessions": [{}, {}, {"frames": [8, 12, 16]}, {"frames": [8, 16, 16]}]}
    assert _clip_lengths(state, spec) == "8 frames in runs 1-2; 8/12/16 frames in run 3; 8/16/16 frames in run 4"
    evaluation = {"captions": 64, "two_object_captions": 26, "samples_per_caption": 4, "steps": 20, "guidance": 2.0,
                  "seed": 0, "device": "cpu", "date": "today", "frechet_distance": 1.0, "frechet_distance_real_vs_real": 1.0}
    lines = _quality_lines(spec, [{**evaluation, "frames": 8, "semantic_accuracy": {"motion": 0.9}},
                                  {**evaluation, "frames": 16, "semantic_accuracy": {"motion": 0.77}}])
    assert "| attribute | 8 frames | 16 frames |" in lines and "| motion | 0.900 | 0.770 |" in lines


if __name__ == "__main__":
    save_file({name: fixed_output(name).contiguous() for name in SPECS}, RECORDED)
    print(f"recorded {RECORDED}")
