"""int8: the layer against PyTorch's own dynamic int8 Linear, the screening on a planted sensitive
layer, saving, counts, and the refusals (training after it, export)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY_VIT, tiny_recipe, write_recipe

import rmtp
from rmtp.errors import DataError, RecipeError
from rmtp.export.refusals import export_problems
from rmtp.measure import count_macs, count_params
from rmtp.run.recipe import load_recipe
from rmtp_plugins.int8 import pruner as int8_pruner
from rmtp_plugins.int8.linear import Int8Linear, quantized_engine

needs_engine = pytest.mark.skipif(quantized_engine() is None, reason="this torch has no quantized engine")


def _pytorch_reference(linear: torch.nn.Linear) -> torch.nn.Module:
    """PyTorch's dynamic int8 Linear with per-channel weights: what ``quantize_dynamic`` builds."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    float_linear = copy.deepcopy(linear)
    float_linear.qconfig = per_channel_dynamic_qconfig
    return DynamicQuantizedLinear.from_float(float_linear)


@needs_engine
@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions")  # the reference's own API
@pytest.mark.parametrize("bias", [True, False])
def test_the_layer_is_pytorchs_dynamic_int8_linear_bit_for_bit(bias: bool) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40, bias=bias)
    with torch.no_grad():
        linear.weight[:, 3] *= 30  # an outlier input column: per-row scales must still match
    reference = _pytorch_reference(linear)
    layer = Int8Linear.from_linear(linear)
    assert torch.equal(layer.weight, reference.weight().int_repr())
    assert torch.equal(layer.scale, reference.weight().q_per_channel_scales().float())
    x = torch.randn(3, 7, 48) * 2
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)


def test_weights_are_within_half_a_step_of_the_float_ones() -> None:
    torch.manual_seed(1)
    linear = torch.nn.Linear(32, 16)
    layer = Int8Linear.from_linear(linear)
    step = linear.weight.detach().abs().amax(dim=1) / 127.5  # the symmetric per-row scale
    assert torch.all((layer.dequantized_weight() - linear.weight).abs() <= step[:, None] / 2 + 1e-7)


@needs_engine
@pytest.mark.parametrize("trial", range(6))
def test_off_the_cpu_the_layer_computes_what_the_kernel_does(monkeypatch, trial: int) -> None:
    """Where the kernel cannot run (a GPU), the layer emulates it: 7-bit per-tensor input, int8
    weights. Equal to the kernel up to float summation order: within a tenth of one product step
    (input step × weight scale), where a single input rounded to another level would move an
    output by a whole step times the weight."""
    torch.manual_seed(trial)
    linear = torch.nn.Linear(96, 64)
    x = torch.randn(4, 13, 96) * (0.1 + trial)
    if trial % 2:
        x[..., 5] *= 50  # an outlier channel sets the input's step
    if trial % 3 == 0:
        x = x.abs()  # an all-positive input: the zero point at 0
    layer = Int8Linear.from_linear(linear)
    with torch.no_grad():
        kernel = layer(x)
        monkeypatch.setattr("rmtp_plugins.int8.linear._kernel_runs_on", lambda x: False)
        emulated = layer(x)
    input_step = (torch.clamp(x.max(), min=0) - torch.clamp(x.min(), max=0)) / 127
    tolerance = 0.1 * float(input_step * layer.scale.max())
    torch.testing.assert_close(emulated, kernel, rtol=0, atol=tolerance)
    assert not torch.allclose(emulated, F.linear(x, layer.dequantized_weight(), linear.bias), rtol=0,
                              atol=tolerance)  # the input really is quantized


def test_inference_runs_with_gradients_on_and_a_backward_through_it_is_refused() -> None:
    upstream = torch.nn.Linear(8, 8)
    layer = Int8Linear.from_linear(torch.nn.Linear(8, 4))
    out = layer(upstream(torch.randn(2, 8)))  # a plain call on a model with trainable float layers
    assert out.shape == (2, 4) and out.requires_grad
    with pytest.raises(RuntimeError, match="passes no gradient"):
        out.sum().backward()


def test_the_layer_takes_one_dimensional_input_and_runs_when_built_under_inference_mode() -> None:
    with torch.inference_mode():
        layer = Int8Linear.from_linear(torch.nn.Linear(8, 4))
        one = layer(torch.ones(8))
        batch = layer(torch.ones(3, 8))
    assert one.shape == (4,)
    torch.testing.assert_close(one, batch[0], rtol=0, atol=0)


@needs_engine
def test_a_used_layer_copies_and_pickles_and_repacks_after_a_load() -> None:
    layer = Int8Linear.from_linear(torch.nn.Linear(8, 4))
    x = torch.randn(2, 8)
    before = layer(x)
    again = pickle.loads(pickle.dumps(copy.deepcopy(layer)))
    torch.testing.assert_close(again(x), before, rtol=0, atol=0)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["bias"] += 1.0
    layer.load_state_dict(state)  # the packed weight must not run the old bias
    torch.testing.assert_close(layer(x), before + 1.0, rtol=0, atol=1e-6)
    layer.to(torch.float64)  # a cast repacks too (the int8 weight stays int8)
    assert layer.weight.dtype == torch.int8
    torch.testing.assert_close(layer(x), before + 1.0, rtol=0, atol=1e-5)


def _tiny_vit_with_a_sensitive_fc2(seed: int = 0) -> torch.nn.Module:
    """A tiny ViT whose block 1 fc2 input has one channel ~1000× the rest (fc1's bias pushes
    neuron 0 far into GELU's linear range), the "massive activation" pretrained ViTs have."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, "depth": 3}).eval()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.bias[0] = 1000.0
        model.blocks[1].mlp.fc2.weight[:, 0] *= 1e-3
        model.head.weight.mul_(20)  # confident predictions: quantization error shows in the KL
    return model


def _images(count: int = 32, seed: int = 0) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 1, 16, 16, generator=generator)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(count, dtype=torch.long))
    return torch.utils.data.DataLoader(dataset, batch_size=16)


@needs_engine
def test_the_screening_keeps_the_planted_sensitive_layer_in_float_and_quantizes_the_rest() -> None:
    model = _tiny_vit_with_a_sensitive_fc2()
    dense = copy.deepcopy(model)
    report = rmtp.prune(model, "int8", calibration=_images(), max_layer_kl=0.05)
    kls = {row.layer: row.detail["KL alone"] for row in report.rows}
    worst = max(kls, key=kls.get)
    assert worst == "blocks.1.mlp.fc2"
    assert kls[worst] > 10 * sorted(kls.values())[-2], kls
    skipped = [row.layer for row in report.rows if row.skipped]
    assert skipped == ["blocks.1.mlp.fc2"], (skipped, kls)
    assert type(model.blocks[1].mlp.fc2) is torch.nn.Linear and type(model.blocks[0].mlp.fc2) is Int8Linear
    assert count_params(model) == count_params(dense)  # every weight kept, in 8 bits
    assert count_macs(model, (1, 16, 16)) == count_macs(dense, (1, 16, 16))  # the int8 kernel's MACs counted
    from rmtp.bench.measuring import _kernels

    assert _kernels(model, torch.device("cpu"), torch.float32) == f"int8 ({quantized_engine()})"
    assert _kernels(dense, torch.device("cpu"), torch.float32) == "dense"


@needs_engine
def test_without_screening_every_layer_is_quantized_and_no_data_is_read() -> None:
    model = _tiny_vit_with_a_sensitive_fc2()
    report = rmtp.prune(model, "int8", screen=False)
    assert not any(row.skipped for row in report.rows)
    assert all("not screened" in row.note for row in report.rows)
    assert all(type(model.get_submodule(row.layer)) is Int8Linear for row in report.rows)


def test_screening_without_calibration_is_refused_in_one_line() -> None:
    with pytest.raises(Exception, match="calibration"):
        rmtp.prune(_tiny_vit_with_a_sensitive_fc2(), "int8")
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 1, 16, 16)), batch_size=4)
    with pytest.raises(DataError, match="screen: false"):
        rmtp.prune(_tiny_vit_with_a_sensitive_fc2(), "int8", calibration=empty)


def test_an_accuracy_budget_without_screening_is_refused_with_the_reason() -> None:
    with pytest.raises(Exception, match="no strength to search"):
        rmtp.prune(_tiny_vit_with_a_sensitive_fc2(), "int8", screen=False, calibration=_images(64),
                   accuracy_budget={"max_drop": 0.2})


@needs_engine
def test_an_accuracy_budget_screens_once_and_applies_the_threshold_it_chose(monkeypatch) -> None:
    model = _tiny_vit_with_a_sensitive_fc2()
    calls = []
    measure = int8_pruner.sensitivities

    def counted(*args, **kwargs):
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(int8_pruner, "sensitivities", counted)
    report = rmtp.prune(model, "int8", calibration=_images(64), accuracy_budget={"max_drop": 0.2, "evaluations": 4})
    assert len(calls) == 1
    chosen = report.agreement["budget"]["chosen"]
    assert report.agreement["top1"] >= 0.8
    kept_float = {row.layer for row in report.rows if row.skipped}
    assert kept_float == {row.layer for row in report.rows if row.detail["KL alone"] > chosen}


@needs_engine
def test_a_saved_int8_model_reloads_to_the_same_outputs(tmp_path: Path) -> None:
    model = _tiny_vit_with_a_sensitive_fc2()
    rmtp.prune(model, "int8", calibration=_images(), max_layer_kl=0.05)
    spec = rmtp.ModelSpec(name="vit_tiny_patch16_224", kwargs={**TINY_VIT, "depth": 3})
    out = rmtp.save(model, tmp_path / "run", spec=spec, arch="vit")
    loaded = rmtp.load(out).model.eval()
    assert type(loaded.blocks[0].attn.qkv) is Int8Linear and loaded.blocks[0].attn.qkv.weight.dtype == torch.int8
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_export_refuses_int8_layers_in_one_line() -> None:
    model = _tiny_vit_with_a_sensitive_fc2()
    rmtp.prune(model, "int8", screen=False)
    problems = export_problems(model, "onnx")
    assert len(problems) == 1 and "int8 layers" in problems[0] and "\n" not in problems[0]
    assert problems[0].startswith("blocks.0.attn.qkv, blocks.0.attn.proj, blocks.0.mlp.fc1 and 9 more:")


@pytest.mark.parametrize("after", [{"finetune": {"epochs": 1}}, {"reconstruct": {"steps": 1}}])
def test_a_recipe_that_trains_after_int8_is_refused_before_it_runs(tmp_path: Path, after: dict) -> None:
    path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe([{"prune": "int8"}, after]))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert any("steps[1]" in p and "after steps[0] (int8)" in p and "pass no gradient" in p
               for p in info.value.problems), info.value.problems
    path = write_recipe(tmp_path / "ok.yaml", tiny_recipe([after, {"prune": "int8"}]))
    load_recipe(path)  # int8 last: accepted


@pytest.mark.parametrize("pruner", [{"prune": "n:m"}, {"prune": "magnitude", "params": {"sparsity": 0.5}}])
def test_a_recipe_that_cuts_weights_after_int8_is_refused_and_tokens_after_it_are_not(tmp_path: Path,
                                                                                      pruner: dict) -> None:
    """n:m and magnitude select plain Linear layers: after int8 they found none and reported an
    empty cut. The recipe is refused with the order that works; token merging after int8 is fine."""
    path = write_recipe(tmp_path / "recipe.yaml", tiny_recipe([{"prune": "int8"}, pruner]))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert any("steps[1]" in p and "cuts weights after steps[0] (int8)" in p for p in info.value.problems), \
        info.value.problems
    load_recipe(write_recipe(tmp_path / "ok.yaml", tiny_recipe([pruner, {"prune": "int8"}])))
    load_recipe(write_recipe(tmp_path / "tokens.yaml", tiny_recipe([{"prune": "int8"}, {"prune": "tome",
                                                                                       "params": {"r": 1}}])))


def test_a_half_precision_cast_keeps_the_scales_exact() -> None:
    """``model.half()`` casts every float buffer; the per-row steps stay float32, unrounded."""
    torch.manual_seed(2)
    layer = Int8Linear.from_linear(torch.nn.Linear(16, 8))
    exact = layer.scale.clone()
    for cast in (torch.nn.Module.half, torch.nn.Module.bfloat16):
        copied = cast(copy.deepcopy(layer))
        assert copied.scale.dtype == torch.float32 and torch.equal(copied.scale, exact)
        assert copied.weight.dtype == torch.int8


def test_validate_warns_that_int8_on_a_gpu_is_not_faster(tmp_path: Path) -> None:
    from rmtp.run.preflight import preflight

    on_gpu = load_recipe(write_recipe(tmp_path / "gpu.yaml", tiny_recipe([{"prune": "int8"}], device="cuda")))
    warnings = preflight(on_gpu).warnings
    assert any("steps[0] (int8) on cuda" in w and "no faster than float" in w for w in warnings), warnings
    on_cpu = load_recipe(write_recipe(tmp_path / "cpu.yaml", tiny_recipe([{"prune": "int8"}], device="cpu")))
    assert not any("int8" in w for w in preflight(on_cpu).warnings)
