"""The shipped weights: load offline, reproduce recorded outputs, stay small.

Recorded outputs come from `python tests/test_reference_models.py` (run it again after retraining).
"""

import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tempocache.reference.models import SPECS, get_spec, load_weights, make_tokenizer, predict_velocity

RECORDED = Path(__file__).parent / "data" / "reference_outputs.safetensors"
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


if __name__ == "__main__":
    save_file({name: fixed_output(name).contiguous() for name in SPECS}, RECORDED)
    print(f"recorded {RECORDED}")
