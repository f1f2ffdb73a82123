"""The model layer: diffusers' hook internals, users' own families, profiles found by fingerprint, modulation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import tempocache
from tempocache.models import families as known
from tempocache.models import find_blocks, find_profile, fingerprint, hooks, modulation_modules, profiles
from tempocache.quant.quantize import quantizable_linears

sys.path.insert(0, str(Path(__file__).parent))
import families  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_diffusers_hook_internals_are_as_tempocache_expects():
    hooks._exercise_internals()  # uncached: what check_internals() ran once when the first hook was added


def test_a_change_in_diffusers_hook_internals_fails_loudly_naming_the_version(monkeypatch):
    import diffusers

    monkeypatch.setattr(hooks, "_set_cache_context", lambda module, context: None)  # contexts no longer delivered
    monkeypatch.setattr(hooks, "check_internals", hooks.check_internals.__wrapped__)
    with pytest.raises(RuntimeError, match=rf"tested with diffusers {hooks.TESTED_WITH}; with diffusers "
                                           rf"{diffusers.__version__} they changed: _set_cache_context did not reach"):
        hooks.check_internals()


class TwinBlock(nn.Module):
    """A dual-stream block of a user's own model: returns (encoder, hidden), no child named like attention."""

    def __init__(self, width: int):
        super().__init__()
        self.mix = nn.Linear(width, width)
        self.modulation = nn.Linear(width, 2 * width)
        self.text = nn.Linear(width, width)

    def forward(self, hidden_states, encoder_hidden_states, temb):
        scale, shift = self.modulation(temb)[:, None].chunk(2, dim=-1)
        hidden = hidden_states + torch.tanh(self.mix(hidden_states * (1 + scale) + shift))
        return encoder_hidden_states + 0.1 * self.text(encoder_hidden_states), hidden


class OwnTransformer(nn.Module):
    def __init__(self, width: int = 16, depth: int = 4):
        super().__init__()
        self.time = nn.Linear(1, width)
        self.layers = nn.ModuleList(TwinBlock(width) for _ in range(depth))
        self.out = nn.Linear(width, width)

    def forward(self, hidden_states, encoder_hidden_states, timestep, return_dict=False):
        temb = self.time(timestep.view(-1, 1) / 1000)
        for layer in self.layers:
            encoder_hidden_states, hidden_states = layer(hidden_states, encoder_hidden_states, temb)
        return (self.out(hidden_states),)


def _own_loop(model, steps=(900.0, 700.0, 500.0, 300.0, 100.0), seed=0):
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(1, 6, 16, generator=g), torch.randn(1, 3, 16, generator=g)
    with torch.no_grad():
        for i, t in enumerate(steps):
            with hooks.cache_context(model, "cond", step_index=i, num_inference_steps=len(steps)):
                x = x - 0.1 * model(x, text, torch.tensor([t]))[0]
    return x


@pytest.fixture
def own_family():
    yield tempocache.register_family(OwnTransformer, ("layers",), {"TwinBlock": (1, 0)}, name="own", modulation=("modulation",))
    known.FAMILIES.pop("OwnTransformer")


def test_an_unregistered_model_is_refused_naming_register_family():
    with pytest.raises(TypeError, match="register it with tempocache.register_family"):
        tempocache.enable(OwnTransformer(), tempocache.StaticCache())


def test_a_users_own_family_registered_is_cached_exactly_as_configured(own_family):
    torch.manual_seed(0)
    model = OwnTransformer()
    reference = _own_loop(model)
    tempocache.enable(model, tempocache.StaticCache(interval=1))
    assert tempocache.stats(model)["family"] == "own"
    assert torch.equal(_own_loop(model), reference)
    tempocache.disable(model)
    tempocache.enable(model, tempocache.StaticCache(interval=2, warmup=1))
    cached = _own_loop(model)
    stats = tempocache.stats(model)
    tempocache.disable(model)
    assert stats["blocks_reused"] == 2 * 4 and stats["blocks_computed"] == 3 * 4  # steps 2 and 4 reused
    assert not torch.equal(cached, reference) and torch.isfinite(cached).all()
    with pytest.warns(UserWarning, match="calibrate"):
        tempocache.enable(model, tempocache.Auto(budget=0.5))  # no profile: zero-shot
    _own_loop(model)
    assert tempocache.stats(model)["compute_fraction"] <= 0.5
    tempocache.disable(model)
    assert torch.equal(_own_loop(model), reference)
    # its modulation stays exact under quantization; the hidden stream's and text stream's linears are 8-bit
    assert [n for n, _ in quantizable_linears(model)] == [f"layers.{i}.{n}" for i in range(4) for n in ("mix", "text")]


@pytest.mark.parametrize("bad, message", [
    (dict(block_lists="layers"), "block_lists must name the attributes"),
    (dict(block_lists=("layers",), output_order={"TwinBlock": (1, 1)}), r"permutation of \(0, 1\)"),
])
def test_register_family_refuses_what_it_cannot_use(bad, message):
    with pytest.raises(ValueError, match=message):
        tempocache.register_family(OwnTransformer, **bad)
    assert "OwnTransformer" not in known.FAMILIES


def test_a_registered_family_with_a_wrong_block_list_says_so(monkeypatch):
    monkeypatch.setitem(known.FAMILIES, "OwnTransformer", known.Family("own", ("blocks",), {}))
    with pytest.raises(TypeError, match=r"registered with block lists \('blocks',\), but has no nn.ModuleList at \['blocks'\]"):
        find_blocks(OwnTransformer())


def test_profiles_are_found_by_the_fingerprint_of_the_model_they_were_measured_on(tmp_path, monkeypatch):
    monkeypatch.setattr(profiles, "_REGISTERED", {kind: [] for kind in profiles.KINDS})
    wan, other_wan = families.tiny("wan").transformer, families.tiny("wan").transformer
    wider = type(wan).from_config({**wan.config, "ffn_dim": 96})
    assert fingerprint(wan) == fingerprint(other_wan) != fingerprint(wider)  # the architecture, not the weights
    path = tmp_path / "wan.json"
    path.write_text(json.dumps({"fingerprint": fingerprint(wan), "format": "fp8", "edges": [0, 4]}))
    assert find_profile("step_cache", wan) is None
    tempocache.register_profile("quant", path)
    assert find_profile("quant", wan) == path and find_profile("quant", wan, format="fp8") == path
    assert find_profile("quant", wan, format="int8") is None and find_profile("quant", wider) is None
    with pytest.raises(ValueError, match="accepted: step_cache, quant"):
        tempocache.register_profile("kv", path)


@pytest.mark.parametrize("name, kept", [("flux", ("norm1.linear", "norm1_context.linear", "norm.linear")),
                                        ("qwen_image", ("img_mod.1", "txt_mod.1")), ("wan", ())])
def test_modulation_linears_are_known_per_family(name, kept):
    transformer = families.tiny(name).transformer
    blocks = find_blocks(transformer)
    modulation = modulation_modules(blocks)
    names = {id(m): n for n, m in transformer.named_modules()}
    found = {names[i].split(".", 2)[2] for i in modulation if isinstance(transformer.get_submodule(names[i]), nn.Linear)}
    assert found == set(kept)
    quantized = {n for n, _ in quantizable_linears(transformer)}
    assert quantized and not any(n.split(".", 2)[2] in kept for n in quantized)
    every_linear = {n for n, _ in quantizable_linears(transformer, filter_fn=lambda module, fqn: True)}
    assert every_linear - quantized == {names[i] for i in modulation if isinstance(transformer.get_submodule(names[i]), nn.Linear)}


def test_no_accelerator_module_imports_the_reference_world():
    import ast

    root = Path(tempocache.__file__).parent
    files = [root / "closed_loop.py", *(p for part in ("models", "step_cache", "quant") for p in (root / part).rglob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "reference" not in (node.module or ""), f"{path.relative_to(root)} imports {node.module}"
            elif isinstance(node, ast.Import):
                assert not any("reference" in a.name for a in node.names), path


def test_the_public_api_is_every_subpackages_and_resolves_to_what_it_names():
    import tempocache.generation  # noqa: F401  (a submodule import must not shadow the function of the same name)

    assert set(tempocache.__all__) >= set(tempocache.step_cache.__all__) | set(tempocache.quant.__all__)
    assert callable(tempocache.generate) and tempocache.generate is tempocache.generation.generate
    for name in tempocache.__all__:
        assert getattr(tempocache, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'enable_cache'"):
        tempocache.enable_cache
