"""Running recipes end to end on the tiny ViT: order, reports, fine-tune masks, output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_recipe, write_recipe

import rmtp
from rmtp.errors import DeviceError
from rmtp.run.pipeline import resolve_device, run_recipe
from rmtp.run.recipe import load_recipe


def test_steps_run_in_recipe_order_and_save(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(
        [
            {"prune": "magnitude", "params": {"sparsity": 0.5}, "layers": {"include": ["blocks.*.mlp.*"]}},
            {"evaluate": {}},
            {"prune": "magnitude", "params": {"sparsity": 0.3, "scope": "layer"}, "name": "attention",
             "layers": {"include": ["re:blocks\\.\\d+\\.attn\\..*"], "exclude": ["*.proj"]}},
            {"finetune": {"epochs": 1, "lr": 1e-3, "distill": {"weight": 0.5}}},
            {"evaluate": {}},
        ],
        output=tmp_path / "out")))
    result = run_recipe(recipe)
    report = result.report
    assert [(s.kind, s.name) for s in report.steps] == [
        ("prune", "magnitude"), ("evaluate", "evaluate"), ("prune", "attention"), ("finetune", "finetune"),
        ("evaluate", "evaluate")]
    assert [r.layer for r in report.steps[0].rows] == [
        "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert [r.layer for r in report.steps[2].rows] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    # whole-model nonzeros fall by exactly what the rows say
    zeroed = sum(r.nonzeros_before - r.nonzeros_after for r in report.steps[0].rows)
    assert report.dense.nonzeros - report.steps[0].stats.nonzeros == zeroed
    assert report.steps[0].stats.params == report.dense.params  # masks do not change shapes
    assert 0 <= report.steps[-1].stats.top1 <= 100 and report.dense.top1 is not None
    # finetune kept every pruned weight at zero
    for row in report.steps[0].rows + report.steps[2].rows:
        weight = result.model.get_submodule(row.layer).weight
        assert int(torch.count_nonzero(weight)) <= row.nonzeros_after
    # the output folder reloads to the same function, and carries recipe + report
    loaded = rmtp.load(tmp_path / "out")
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(loaded.model(x), result.model(x), rtol=0, atol=0)
    saved_report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["kind"] for s in saved_report["steps"]] == ["prune", "evaluate", "prune", "finetune", "evaluate"]
    assert saved_report["steps"][0]["layers"][0]["layer"] == "blocks.0.mlp.fc1"
    saved_recipe = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert saved_recipe["steps"][0] == {"prune": "magnitude", "params": {"sparsity": 0.5, "scope": "global"},
                                        "layers": {"include": ["blocks.*.mlp.*"], "exclude": []}, "precision": "fp32"}


def test_saved_folder_can_be_the_next_recipe_model(tmp_path: Path) -> None:
    first = run_recipe(load_recipe(write_recipe(tmp_path / "a.yaml", tiny_recipe(
        [{"prune": "magnitude", "params": {"sparsity": 0.5}}], output=tmp_path / "a"))))
    second_recipe = tiny_recipe([{"prune": "magnitude", "params": {"sparsity": 0.7}}])
    second_recipe["model"]["checkpoint"] = str(tmp_path / "a")
    second = run_recipe(load_recipe(write_recipe(tmp_path / "b.yaml", second_recipe)))
    assert second.report.dense.nonzeros == first.report.steps[0].stats.nonzeros  # starts where the first ended
    assert second.report.steps[0].stats.nonzeros < second.report.dense.nonzeros


def test_evaluate_latency_is_measured_side_by_side(tmp_path: Path) -> None:
    result = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(
        [{"evaluate": {"latency": True, "latency_batch": 2}}]))))
    stats = result.report.steps[0].stats
    assert stats.latency_ms > 0 and stats.dense_latency_ms > 0
    assert stats.speedup["batch"] == 2 and stats.speedup["rounds"] == 15 and stats.speedup["ratio"]["n"] == 15
    assert stats.speedup["verdict"] in {"faster", "slower", "same", "noisy"}
    assert any("interleaved rounds" in note for note in result.report.steps[0].notes)


def _spread(median: float, q1: float, q3: float):
    from rmtp.measure import Spread

    return Spread(median=median, q1=q1, q3=q3, min=q1, max=q3, n=15)


@pytest.mark.parametrize("ratio,verdict,shown", [
    ((1.50, 1.45, 1.55), "faster", "×1.50 [1.45–1.55] speed-up"),
    ((0.70, 0.68, 0.72), "slower", "×0.70 [0.68–0.72] speed-up"),
    ((1.02, 0.97, 1.06), "same", "not measurably faster or slower"),
    ((0.40, 0.20, 0.90), "noisy", "no speed-up figure"),  # the quickstart's "×0.40" on a busy machine
])
def test_a_speedup_is_printed_only_where_it_means_something(ratio, verdict: str, shown: str) -> None:
    from rmtp.measure import PairedSpeedup

    timing = PairedSpeedup(dense_ms=_spread(5.0, 4.8, 5.2), pruned_ms=_spread(5.0, 4.8, 5.2), ratio=_spread(*ratio),
                           batch=1, threads=2, rounds=15)
    assert timing.verdict == verdict
    assert shown in timing.describe() and "2 threads, 15 interleaved rounds" in timing.describe()
    if verdict in {"same", "noisy"}:
        assert "×0.40 speed-up" not in timing.describe() and "speed-up, median" not in timing.describe()


def test_evaluate_latency_threads_are_used_and_restored(tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    result = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(
        [{"evaluate": {"latency": True, "latency_threads": 1, "latency_rounds": 3}}]))))
    assert result.report.steps[0].stats.speedup["threads"] == 1 and torch.get_num_threads() == before


def test_mac_counts_include_attention(tmp_path: Path) -> None:
    result = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe([{"evaluate": {}}]))))
    tokens, dim, depth = 17, 32, 2  # 16 patches + CLS
    assert result.report.dense.attention_macs == depth * 2 * tokens * tokens * dim


def test_cuda_without_gpu_is_refused(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="CUDA is not available on this machine$"):
        resolve_device("cuda")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe([{"evaluate": {}}], device="cuda")))
    with pytest.raises(DeviceError, match="CUDA is not available on this machine; run with device: cpu$"):
        run_recipe(recipe)  # the recipe's own option, before any model is built


def test_auto_device_picks_what_torch_sees() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="not a valid torch device.*; run with --device cpu$"):
        resolve_device("nonsense", option="--device")


def _asking_pruner():
    """A pruner that answers the pipeline's questions by overriding the methods, not the attributes."""
    from rmtp.contract.pruner import LayerRow, PruneContext, Pruner, PrunerParams, weight_footprint

    class Asks(Pruner):
        name = "asks"
        description = "test pruner: records what it was given"
        kind = "mask"
        Params = PrunerParams
        seen: dict = {}

        @classmethod
        def candidate_layers(cls, arch, model):
            return [layer for layer in arch.prunable_layers(model) if layer.name.endswith("fc1")]

        @classmethod
        def calibration_needed(cls) -> bool:
            return True

        @classmethod
        def prunes_weights(cls) -> bool:
            return False

        def prune(self, ctx: PruneContext, params: PrunerParams) -> list[LayerRow]:
            Asks.seen.update(layers=[layer.name for layer in ctx.layers], calibration=ctx.calibration is not None)
            shape, n, nz = weight_footprint(ctx.module(ctx.layers[0]))
            return [LayerRow(ctx.layers[0].name, shape, shape, n, n, nz, nz)]

    return Asks


def test_a_recipe_carries_its_plugins_and_resolved_prune_steps(tmp_path: Path) -> None:
    from rmtp.plugins import load_plugins
    from rmtp.run.recipe import ResolvedPrune, parse_recipe

    asks = _asking_pruner()
    plugins = load_plugins()  # a private registry: never made the process-wide one
    plugins.pruners.add(asks)
    recipe = parse_recipe(tiny_recipe([{"prune": "asks", "name": "probe"}, {"evaluate": {}},
                                       {"prune": "magnitude", "params": {"sparsity": 0.2}}]), plugins=plugins)
    assert recipe.plugins is plugins
    first, _, last = recipe.plan
    from rmtp.latency import LatencySettings

    # latency: the defaults, resolved (no later evaluate times latency to take batch/threads from)
    assert first == ResolvedPrune(pruner_cls=asks, params=asks.Params(), layers=None, name="probe",
                                  latency=LatencySettings())
    assert last.pruner_cls is plugins.pruners.get("magnitude") and last.params.sparsity == 0.2
    assert last.label == "magnitude" and first.label == "probe"
    assert "asks" not in rmtp.get_plugins().pruners

    result = run_recipe(recipe)  # the recipe's plugins, not the process-wide ones
    assert asks.seen["layers"] and all(name.endswith("fc1") for name in asks.seen["layers"])
    assert asks.seen["calibration"] is True
    assert [s.name for s in result.report.steps] == ["probe", "evaluate", "magnitude"]


def test_pruner_capabilities_default_to_the_documented_attributes() -> None:
    from rmtp.contract.pruner import Pruner, PrunerParams

    class Plain(Pruner):
        name, description, kind, Params = "plain", "test", "mask", PrunerParams

        def prune(self, ctx, params):
            return []

    class Revisits(Plain):
        kind = "token"
        needs_calibration = True
        revisits_replaced_layers = True

    class Arch:
        def prunable_layers(self, model, include_replaced=False):
            return ["replaced too"] if include_replaced else ["plain"]

    assert (Plain.calibration_needed(), Plain.prunes_weights(), Plain.candidate_layers(Arch(), None)) == \
        (False, True, ["plain"])
    assert (Revisits.calibration_needed(), Revisits.prunes_weights(), Revisits.candidate_layers(Arch(), None)) == \
        (True, False, ["replaced too"])


def test_the_report_records_and_prints_the_preprocessing(tmp_path) -> None:
    from rich.console import Console

    from rmtp.reports.render import render_report
    from rmtp.run.recipe import parse_recipe

    result = run_recipe(parse_recipe(tiny_recipe([{"evaluate": {}}], data={"name": "digits", "eval_limit": 32})))
    recorded = result.report.to_dict()["preprocessing"]
    assert recorded["name"] == "digits" and recorded["input_size"] == [1, 16, 16]
    console = Console(width=200, record=True)
    render_report(result.report, console)
    assert "data: preprocessing (digits, fixed): 8x8 → 16x16 bilinear" in console.export_text()
