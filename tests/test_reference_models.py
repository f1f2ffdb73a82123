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
from tempocache.reference.models import SPECS, get_spec, load_weights, make_tokenizer, predict_velocity

RECORDED = Path(__file__).parent / "data" / "reference_outputs.safetensors"
RESULTS = Path(__file__).parents[1] / "benchmarks" / "results"
CAPTION = {"shapes-t2v": "a green triangle moves up on a gray background", "shapes-t2i": "a green triangle on a gray background"}


def fixed_output(name: str) -> torch.Tensor:
    spec = get_spec(name)
    transformer, text_encoder = load_weights(spec.directory, spec)
    x = torch.randn(1, 3, spec.num_frames, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return predict_velocity(transformer, x, torch.tensor([0.6]), text_encoder(make_tokenizer()([CAPTION[name]])))


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
    assert {e["model"] for e in evaluations} == set(SPECS)
    assert {e["frames"] for e in evaluations if e["model"] == "shapes-t2v"} >= {8, 16}
    for e in evaluations:
        assert e["captions"] >= 64 and not below_bars(e["semantic_accuracy"]), (e["model"], e.get("frames"))


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
