"""Quantization on tiny random-weight Wan and Flux transformers (and the shipped profiles on the reference models).

The toy sampler is the one of test_step_cache: x <- x - 0.1 * model(x, t) over 6 steps. The CPU path
simulates the 8-bit kernels; where torch has the kernels on the CPU, they are checked against it here,
and on a GPU by the same test on the device.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import tempocache
from tempocache import closed_loop
from tempocache.models import find_blocks
from tempocache.quant import adaptive, attention
from tempocache.quant.adaptive import MIX_BUDGETS, MIXES, STATIC_MIX
from tempocache.quant.attention import FP8Attention, FP8AttentionMode, kernel_unavailable, quantize_qkv, simulated_attention
from tempocache.quant.linear import QuantLinear
from tempocache.quant.numerics import dequantize_rows, kernel_matmul, quantize_rows, simulated_matmul
from tempocache.quant.quantize import quantizable_linears, replace_linears, resolve_format

sys.path.insert(0, str(Path(__file__).parent))
import families  # noqa: E402

STEPS = (900.0, 740.0, 580.0, 420.0, 260.0, 100.0)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


pytestmark = pytest.mark.usefixtures("one_thread")


def denoise(fam, seed: int = 0, steps=STEPS, after_call=lambda: None) -> torch.Tensor:
    x = fam.inputs(1, 8, steps[0], seed)["hidden_states"]
    with torch.no_grad():
        for t in steps:
            kwargs = fam.inputs(1, 8, t, seed)
            kwargs["hidden_states"] = x
            x = x - 0.1 * fam.transformer(**kwargs, return_dict=False)[0]
            after_call()
    return x


def fresh(name: str):
    torch.manual_seed(0)
    return families.tiny(name)


def profile_for(name: str, fmt: str = "fp8") -> tempocache.QuantProfile:
    fam = fresh(name)
    return tempocache.calibrate_quant(fam.transformer, [0, 1], run=lambda t, seed: denoise(fam, seed), format=fmt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_kernels_match_the_simulated_numerics(device, fmt):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(64, 256, generator=g), torch.randn(128, 256, generator=g), torch.randn(128, generator=g)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w, b = x.to(device, dtype), w.to(device, dtype), b.to(device, dtype)
    a_q, a_scale = quantize_rows(x, fmt)
    w_q, w_scale = quantize_rows(w, fmt)
    simulated = simulated_matmul(a_q, a_scale, w_q, w_scale, b, torch.float32)
    kernel = kernel_matmul(a_q, a_scale, w_q, w_scale, b, dtype).float()
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16 output rounding; float32 summation order
    assert (kernel - simulated).abs().max() <= tolerance * simulated.abs().max()
    exact = x.float() @ w.float().t() + b.float()
    error = ((simulated - exact).norm() / exact.norm()).item()
    assert 1e-4 < error < (0.05 if fmt == "fp8" else 0.015)  # really quantized, and not by much


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantize_rows_range_and_roundtrip(fmt):
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 32)[:, None]
    x_q, scale = quantize_rows(x, fmt)
    assert x_q.dtype == (torch.float8_e4m3fn if fmt == "fp8" else torch.int8) and scale.shape == (32, 1)
    assert x_q.float().abs().amax(dim=1).sub(448.0 if fmt == "fp8" else 127.0).abs().max() < 1e-3  # every row uses the full range
    relative = (dequantize_rows(x_q, scale, torch.float32) - x).norm(dim=1) / x.norm(dim=1)
    assert relative.max() < (0.05 if fmt == "fp8" else 0.01)


def test_quant_linear_paths():
    linear = nn.Linear(64, 48)
    layer = QuantLinear(linear, "int8")
    x = torch.randn(2, 5, 64)
    layer.low_precision = False
    weight = dequantize_rows(layer.weight_q, layer.weight_scale, torch.float32)
    high = layer(x)
    assert torch.equal(high, nn.functional.linear(x, weight, linear.bias))
    layer.low_precision = True
    low = layer(x)
    assert low.shape == (2, 5, 48) and not torch.equal(low, high)
    assert (low - linear(x)).norm() / linear(x).norm() < 0.02
    assert layer.weight_q.element_size() == 1 and not hasattr(layer, "weight")


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_quantize_replaces_block_linears_only(name):
    fam = fresh(name)
    outside = {n for n, m in fam.transformer.named_modules() if isinstance(m, nn.Linear)} - {n for n, _ in quantizable_linears(fam.transformer)}
    state = tempocache.quantize(fam.transformer, tempocache.W8A8("int8"))
    modules = dict(fam.transformer.named_modules())
    assert state.layers and all(isinstance(modules[n], QuantLinear) for n in state.layers)
    assert all(isinstance(modules[n], nn.Linear) for n in outside)  # embeddings, modulation, final projection stay exact
    assert any(".norm" in n for n in outside) == (name == "flux")  # flux's adaLN modulation linears are kept
    assert state.stats()["weight_bytes_after"] < state.stats()["weight_bytes_before"] / 3.5  # float32 -> 8 bits + scales


def test_filter_fn_chooses_the_linears_and_profiles_must_match_it():
    fam = fresh("wan")
    only_ffn = lambda module, name: ".ffn." in name  # noqa: E731
    state = tempocache.quantize(fam.transformer, tempocache.W8A8("int8"), filter_fn=only_ffn)
    assert sorted(state.layers) == sorted(f"blocks.{i}.ffn.net.{n}" for i in range(4) for n in ("0.proj", "2"))
    assert all(type(fam.transformer.get_submodule(f"blocks.{i}.attn1.to_q")) is nn.Linear for i in range(4))
    with pytest.raises(ValueError, match="do not match the 8 linears being quantized"):
        tempocache.quantize(fresh("wan").transformer, tempocache.TimestepAdaptive(format="int8", profile=profile_for("wan", "int8")),
                            filter_fn=only_ffn)
    with pytest.raises(TypeError, match="filter_fn accepts"):
        tempocache.quantize(fresh("wan").transformer, filter_fn=lambda module, name: False)


def test_each_quantized_model_holds_its_own_activations_and_frees_them_after_each_call():
    one, two = fresh("wan"), fresh("wan")
    states = [tempocache.quantize(fam.transformer, tempocache.W8A8("fp8")) for fam in (one, two)]
    assert states[0].activations is not states[1].activations
    assert all(layer.activations is states[0].activations for layer in states[0].layers.values())
    denoise(one)
    assert states[0].activations.last == () == states[1].activations.last


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_zero_budget_changes_nothing_but_weight_rounding(name):
    """TimestepAdaptive(budget=0) runs every layer W8A16: exactly the model with its weights rounded to 8 bits."""
    profile = profile_for(name, "int8")
    rounded = fresh(name)
    for layer_name, _ in quantizable_linears(rounded.transformer):
        linear = rounded.transformer.get_submodule(layer_name)
        with torch.no_grad():
            linear.weight.copy_(dequantize_rows(*quantize_rows(linear.weight, "int8"), torch.float32))
    fam = fresh(name)
    state = tempocache.quantize(fam.transformer, tempocache.TimestepAdaptive(budget=0.0, format="int8", profile=profile))
    assert torch.equal(denoise(fam), denoise(rounded))
    assert state.stats()["low_precision_share"] == 0.0


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_full_budget_is_static_w8a8_and_generations_do_not_leak(name):
    profile = profile_for(name, "fp8")
    static, adaptive = fresh(name), fresh(name)
    tempocache.quantize(static.transformer, tempocache.W8A8("fp8"))
    tempocache.quantize(adaptive.transformer, tempocache.TimestepAdaptive(budget=1.0, format="fp8", profile=profile))
    first = denoise(adaptive)
    assert torch.equal(first, denoise(static))
    denoise(adaptive, seed=3)
    assert torch.equal(denoise(adaptive), first)


def test_adaptive_meets_the_budget_over_generations_and_follows_the_steps():
    profile = replace(profile_for("wan", "fp8"), mixes={})  # the predictor alone, whatever calibration preferred
    fam = fresh("wan")
    state = tempocache.quantize(fam.transformer, tempocache.TimestepAdaptive(budget=0.5, format="fp8", profile=profile))
    choices = []
    for seed in (0, 1):  # the calibration generations
        denoise(fam, seed, after_call=lambda: choices.append(tuple(layer.low_precision for layer in state.controller.layers)))
    assert abs(state.stats()["low_precision_share"] - 0.5) < 0.1
    assert len(set(choices)) > 1  # the choice of layers follows the measured block changes
    assert len({sum(c) for c in choices}) > 1  # and so does how many run in 8 bits


def test_threshold_spans_the_budgets():
    profile = profile_for("flux", "int8")
    for mix in MIXES:
        thresholds = [profile.threshold(b, mix) for b in (0.0, 0.3, 0.6, 1.0)]
        assert thresholds[0] == -float("inf") and thresholds[-1] == float("inf") and thresholds == sorted(thresholds)
    largest = max(profile.macs) / sum(profile.macs)
    for budget in (0.3, 0.6, 0.9):  # static mixed precision: the same layers every call, never more than the budget
        assert budget - largest <= profile.static_share(budget) <= budget


def test_calibration_keeps_the_mix_that_drifted_least_and_runs_use_it():
    profile = profile_for("wan", "int8")
    assert set(profile.mixes) == {str(b) for b in MIX_BUDGETS}
    for budget, drifts in profile.mix_drift.items():
        assert len(drifts) == len(MIXES) and profile.mixes[budget] == list(MIXES[drifts.index(min(drifts))])
        assert len(set(drifts)) > 1  # the mixes choose differently
    fam = fresh("wan")
    state = tempocache.quantize(fam.transformer, tempocache.TimestepAdaptive(budget=0.65, format="int8", profile=profile))
    assert state.controller.mix == tuple(profile.mixes["0.7"])  # the nearest calibrated budget's
    static_mix = replace(profile, mixes={"0.5": list(STATIC_MIX)})  # the static mix is static mixed precision, bit for bit
    outputs = []
    for config in (tempocache.TimestepAdaptive(0.5, "int8", static_mix), tempocache.TimestepAdaptive(0.5, "int8", profile, per_step=False)):
        fam = fresh("wan")
        tempocache.quantize(fam.transformer, config)
        outputs.append(denoise(fam))
    assert torch.equal(*outputs)


def test_step_estimate_is_each_layers_mean_error_at_that_step():
    profile = profile_for("flux", "fp8")
    table = torch.tensor(profile.step_error, dtype=torch.float64)
    assert table.shape == (len(profile.layers), len(STEPS))
    assert torch.allclose(table.mean(1), torch.tensor(profile.mean_error, dtype=torch.float64))  # as many calls per step
    assert (table.std(1) > 0).all()  # a layer's error depends on the step
    step = 2  # an estimate read at a calibrated step is that step's column, between two steps in between
    at_step = profile.error_estimate(None, profile.step_timesteps[step], "step")
    assert torch.allclose(torch.as_tensor(at_step), table[:, step])
    between = profile.error_estimate(None, sum(profile.step_timesteps[step:step + 2]) / 2, "step")
    assert torch.allclose(torch.as_tensor(between), table[:, step:step + 2].mean(1))


def test_drift_is_the_geometric_mean_over_samples_of_each_final_error():
    exact = torch.zeros(2, 4)  # two generated samples
    approx = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.02]])  # RMS errors 1 and 0.01: geometric mean 0.1
    assert closed_loop.drift(approx, exact) == pytest.approx(0.1)
    halved_small, halved_large = approx.clone(), approx.clone()
    halved_small[1] /= 2  # halving the small error lowers the drift as much as halving the large one
    halved_large[0] /= 2
    assert closed_loop.drift(halved_small, exact) == pytest.approx(closed_loop.drift(halved_large, exact))


def test_half_drifts_score_the_even_and_the_odd_samples_apart():
    errors = torch.tensor([1.0, 0.5, 0.25, 2.0])  # each sample's RMS error: even samples 1 and 0.25, odd 0.5 and 2
    batches = [torch.zeros(4, 3), errors[:, None].expand(4, 3)]
    loop = closed_loop.ClosedLoop(None, ["batch"], run=lambda pipe, prompt: batches.pop(0))
    loop.exact = loop.generate()
    assert loop.half_drifts(contextlib.nullcontext()) == pytest.approx((0.5, 1.0))
    single = closed_loop.ClosedLoop(None, ["one"], run=lambda pipe, prompt: torch.full((1, 3), float(len(prompt))))
    single.exact = torch.zeros(1, 3)
    assert single.half_drifts(contextlib.nullcontext()) == pytest.approx((3.0, 3.0))


def test_calibration_measures_the_generated_samples():
    pipe_output = type("Output", (), {"frames": torch.ones(2, 3, 4, 5).numpy()})()  # e.g. (samples, frames, h, w)
    assert closed_loop.generated_samples(pipe_output).shape == (2, 60)
    fam, runs = fresh("wan"), []
    with pytest.raises(TypeError, match="output_type='pt' or 'np'"):
        tempocache.calibrate_quant(fam.transformer, [0], run=lambda t, seed: runs.append(seed) or [denoise(fam, seed)])
    assert runs == [0]  # at the first generation, before the long per-layer pass
    assert not any(isinstance(m, QuantLinear) for m in fam.transformer.modules())


def test_calibrate_quant_refuses_runs_that_do_not_repeat():
    fam, seeds = fresh("wan"), iter(range(100))
    with pytest.raises(ValueError, match="deterministic runs"):
        tempocache.calibrate_quant(fam.transformer, [0], run=lambda t, seed: denoise(fam, next(seeds)))
    assert next(seeds) == 2  # refused after the second run, before the per-layer pass
    assert not any(isinstance(m, QuantLinear) for m in fam.transformer.modules())


def test_first_generation_step_uses_the_calibrated_changes():
    profile = profile_for("wan", "fp8")
    assert len(profile.initial_change) == 4 and all(c > 0 for c in profile.initial_change)
    assert len(profile.layers) == len(profile.coefficients) == len(profile.macs) == 4 * 10
    assert len(profile.call_changes) == 2 * len(STEPS)


def test_calibrate_quant_leaves_the_model_as_it_was():
    fam = fresh("flux")
    before = denoise(fam)
    linears = {n: m for n, m in fam.transformer.named_modules() if isinstance(m, nn.Linear)}
    tempocache.calibrate_quant(fam.transformer, [0], run=lambda t, seed: denoise(fam, seed))
    assert {n: m for n, m in fam.transformer.named_modules() if isinstance(m, nn.Linear)} == linears
    assert torch.equal(denoise(fam), before)
    assert not any(isinstance(m, QuantLinear) for m in fam.transformer.modules())


def test_calibrate_quant_frees_its_8bit_layers_without_waiting_for_the_garbage_collector(monkeypatch):
    fam = fresh("wan")
    made = []

    def recording(*args):
        originals, layers = replace_linears(*args)
        made.extend(layers.values())
        return originals, layers

    monkeypatch.setattr(adaptive, "replace_linears", recording)
    gc.disable()
    try:
        tempocache.calibrate_quant(fam.transformer, [0], run=lambda t, seed: denoise(fam, seed))
        alive = [weakref.ref(layer) for layer in made]
        made.clear()
        assert alive and all(ref() is None for ref in alive)  # their weights' memory is back before the next model loads
    finally:
        gc.enable()


def test_time_embedding_is_exact_and_cached():
    fam = fresh("wan")
    state = tempocache.quantize(fam.transformer, tempocache.W8A8("int8"))
    first = denoise(fam)
    misses = state.stats()["time_embedding_misses"]
    assert misses == len(STEPS) and state.stats()["time_embedding_hits"] == 0
    assert torch.equal(denoise(fam), first)  # the second generation reads every embedding from the cache
    assert state.stats()["time_embedding_hits"] == len(STEPS) and state.stats()["time_embedding_misses"] == misses


@pytest.mark.parametrize("quantize_first", [True, False])
def test_step_cache_and_quantization_compose_in_either_order(quantize_first):
    def run(first: bool) -> torch.Tensor:
        fam = fresh("wan")
        steps = [lambda: tempocache.quantize(fam.transformer, tempocache.W8A8("fp8")),
                 lambda: tempocache.enable(fam.transformer, tempocache.StaticCache(interval=2))]
        for apply in steps if first else steps[::-1]:
            apply()
        out = denoise(fam)
        assert tempocache.stats(fam.transformer)["compute_fraction"] < 0.7
        return out

    cached_quantized = run(quantize_first)
    assert torch.equal(cached_quantized, run(not quantize_first))
    plain = fresh("wan")
    tempocache.quantize(plain.transformer, tempocache.W8A8("fp8"))
    assert not torch.equal(cached_quantized, denoise(plain))


def test_bad_input_is_refused_before_anything_changes():
    fam = fresh("wan")
    with pytest.raises(ValueError, match=r"budget must be in \[0, 1\]"):
        tempocache.quantize(fam.transformer, tempocache.TimestepAdaptive(budget=1.5))
    with pytest.raises(ValueError, match="accepted: fp8, int8"):
        tempocache.quantize(fam.transformer, tempocache.W8A8("fp4"))
    with pytest.raises(ValueError, match="no fp8 quantization profile"):
        tempocache.quantize(fam.transformer, tempocache.TimestepAdaptive(format="fp8"))
    with pytest.raises(ValueError, match="do not match"):
        tempocache.quantize(fam.transformer, tempocache.TimestepAdaptive(format="fp8", profile=profile_for("flux")))
    with pytest.raises(ValueError, match="fitted for fp8"):
        tempocache.quantize(fam.transformer, tempocache.TimestepAdaptive(format="int8", profile=profile_for("wan")))
    with pytest.raises(TypeError, match="W8A8"):
        tempocache.quantize(fam.transformer, tempocache.StaticCache())
    with pytest.raises(TypeError, match=r"got the class W8A8: pass W8A8\(...\)"):
        tempocache.quantize(fam.transformer, tempocache.W8A8)
    with pytest.raises(ValueError, match="attention must be True or False, got 'yes'"):
        tempocache.quantize(fam.transformer, tempocache.W8A8(attention="yes"))
    assert not any(isinstance(m, QuantLinear) for m in fam.transformer.modules())
    tempocache.quantize(fam.transformer)
    with pytest.raises(RuntimeError, match="already quantized"):
        tempocache.quantize(fam.transformer)
    with pytest.raises(RuntimeError, match="unmodified model"):
        tempocache.calibrate_quant(fam.transformer, [0], run=lambda t, seed: denoise(fam, seed))


def test_fp8_on_a_gpu_without_it_is_refused_naming_the_alternatives(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"NVIDIA A100 has 8\.0: use format='int8' .* or 'auto', or quantize on the CPU"):
        resolve_format("fp8", torch.device("cuda"))
    assert resolve_format("auto", torch.device("cuda")) == resolve_format("int8", torch.device("cuda")) == "int8"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_format("fp8", torch.device("cuda")) == resolve_format("auto", torch.device("cuda")) == "fp8"


def test_linears_the_kernels_cannot_take_stay_exact_and_are_reported():
    torch.manual_seed(0)
    fam = families.tiny("wan")
    odd = fam.transformer.__class__.from_config({**fam.transformer.config, "ffn_dim": 40})  # 40: not a multiple of 16
    baseline = odd(**fam.inputs(), return_dict=False)[0]
    with pytest.warns(UserWarning, match="keeps 8 block linears exact") as warned:
        state = tempocache.quantize(odd, tempocache.W8A8("int8"))
    assert str(warned[0].message).splitlines()[1:] == [  # one line per reason, not one per layer
        "  4 linear(s) of 32 x 40: 8-bit kernels need multiples of 16 (e.g. blocks.0.ffn.net.0.proj)",
        "  4 linear(s) of 40 x 32: 8-bit kernels need multiples of 16 (e.g. blocks.0.ffn.net.2)"]
    kept = state.stats()["kept_exact"]
    assert sorted(kept) == sorted(f"blocks.{i}.ffn.net.{n}" for i in range(4) for n in ("0.proj", "2"))
    assert kept["blocks.0.ffn.net.2"] == "40 x 32: 8-bit kernels need multiples of 16"
    assert all(type(odd.get_submodule(n)) is nn.Linear for n in kept)
    assert len(state.layers) == len(quantizable_linears(odd)) > 0  # the attention projections are 8-bit
    assert not torch.equal(odd(**fam.inputs(), return_dict=False)[0], baseline)


@pytest.mark.parametrize("model", tempocache.SHIPPED_MODELS)
def test_shipped_profiles_match_the_reference_models(model):
    pipe = tempocache.load_pipeline(model)
    for fmt in ("fp8", "int8"):
        config = tempocache.TimestepAdaptive(format=fmt)
        names = [n for n, _ in quantizable_linears(pipe.transformer)]
        if pipe.spec.task == "edit":  # its generator's profile, of the same architecture, is not taken for it
            with pytest.raises(ValueError, match=f"no {fmt} quantization profile .*tempocache calibrate"):
                config.prepare(pipe.transformer, fmt, names)
            continue
        assert config.prepare(pipe.transformer, fmt, names).profile.format == fmt


def test_fp8_attention_numerics():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 200, 32) for _ in range(3))
    exact = nn.functional.scaled_dot_product_attention(q, k, v)
    fp8_attention = FP8Attention()
    fp8 = fp8_attention(q, k, v)
    assert 0.01 < ((fp8 - exact).norm() / exact.norm()).item() < 0.1  # e4m3 rounding, not a wrong result
    assert torch.equal(fp8_attention(q, k + torch.randn(1, 3, 1, 32), v), fp8)  # K's mean over tokens is removed exactly
    q8, k8, v8, s_q, s_k, s_v = quantize_qkv(q, k, v)
    assert q8.dtype == k8.dtype == v8.dtype == torch.float8_e4m3fn and s_q.shape == (1, 1, 1, 1)
    assert k8.float().abs().amax() == v8.float().abs().amax() == 448
    assert torch.equal(simulated_attention(q8, k8, v8, s_q, s_k, s_v, 32 ** -0.5, torch.float32), fp8)
    mode = FP8AttentionMode()
    with mode:
        assert torch.equal(nn.functional.scaled_dot_product_attention(query=q, key=k, value=v), fp8)
        mask = torch.ones(200, 200, dtype=torch.bool)
        assert torch.equal(nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                           nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        nn.functional.scaled_dot_product_attention(q, k[:, :, :50], v[:, :, :50])
        cached_k, cached_v = torch.cat([k, k.flip(2)], 2), torch.cat([v, v.flip(2)], 2)  # a cache's keys and the chunk's
        nn.functional.scaled_dot_product_attention(q, cached_k, cached_v)  # not from a self-attention module: exact
        mode.more_keys = True  # what FP8AttentionHook sets in a module with is_cross_attention False
        over_cache = nn.functional.scaled_dot_product_attention(q, cached_k, cached_v)
        nn.functional.scaled_dot_product_attention(q, k[:, :, :50], v[:, :, :50])  # fewer keys: cross-attention
    assert mode.fp8_calls == 2
    assert mode.exact_calls == {"mask, dropout, causal or grouped heads": 2, "not self-attention": 3}
    assert torch.equal(over_cache, fp8_attention(q, cached_k, cached_v))
    exact = nn.functional.scaled_dot_product_attention(q, cached_k, cached_v)
    assert 0.01 < ((over_cache - exact).norm() / exact.norm()).item() < 0.1


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_fp8_attention_runs_self_attention_only_and_generations_do_not_leak(name):
    linears_only, with_attention = fresh(name), fresh(name)
    tempocache.quantize(linears_only.transformer, tempocache.W8A8("fp8"))
    state = tempocache.quantize(with_attention.transformer, tempocache.W8A8("fp8", attention=True))
    first, reference = denoise(with_attention), denoise(linears_only)
    assert 0 < ((first - reference).norm() / reference.norm()) < 0.05
    calls = len(STEPS) * len(find_blocks(with_attention.transformer))
    stats = state.stats()
    assert stats["attention_fp8_calls"] == calls  # every block's self-attention
    assert stats["attention_exact_calls"] == ({"not self-attention": calls} if name == "wan" else {})  # wan's text cross-attention
    assert torch.equal(denoise(with_attention), first)
    assert torch.equal(nn.functional.scaled_dot_product_attention(*(torch.ones(1, 1, 4, 16),) * 3), torch.ones(1, 1, 4, 16))


def test_fp8_attention_where_the_gpu_has_no_kernel_is_refused_naming_the_alternatives(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    assert kernel_unavailable(torch.device("cuda")) == \
        "NVIDIA L4 has compute capability 8.9; cuDNN's FP8 attention needs 9.0+ (Hopper)"
    assert kernel_unavailable(torch.device("cpu")) == "not a CUDA device"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: None)
    assert "pip install nvidia-cudnn-frontend" in kernel_unavailable(torch.device("cuda"))
