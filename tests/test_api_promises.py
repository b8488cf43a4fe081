"""What the library API and the quickstart promise a newcomer, held to it (issue 23).

``rmtp.unpatch`` gives the plain forward back, ``rmtp.save`` takes what ``rmtp.load`` gives,
``rmtp.prune`` hands the model back in the mode it got it and refuses a model its architecture
cannot handle before running it, a pruner that skipped layers says so where it is always seen,
the run summary carries the dense latency it measured and a headline, and the README's svd-mp
example plans its splits for the batch the quickstart does.
"""

from __future__ import annotations

import ast
import copy
import io
import re

import pytest
import timm
import torch
import yaml
from conftest import REPO, TINY_VIT
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rmtp
from rmtp.errors import PluginError
from rmtp.latency.settings import LatencySettings
from rmtp.run.pipeline import seed_everything


def _tiny_vit(seed: int = 0) -> nn.Module:
    seed_everything(seed)
    return timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()


def _images() -> torch.Tensor:
    return torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def _outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_images())


def test_unpatch_restores_the_plain_forward_bit_for_bit() -> None:
    model = _tiny_vit()
    plain = _outputs(copy.deepcopy(model))
    rmtp.prune(model, "token-cls", r_max=0.5, alpha=1.5)
    with pytest.raises(PluginError, match=r"already token-reduced .*rmtp\.unpatch\(model\)"):
        rmtp.prune(model, "token-mean", r_max=0.5)
    assert rmtp.unpatch(model) is model
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    torch.testing.assert_close(_outputs(model), plain, atol=0, rtol=0)
    rmtp.prune(model, "token-mean", r_max=0.5)  # a second token pruner is taken now
    assert rmtp.unpatch(rmtp.unpatch(model)) is model  # nothing left to remove: unchanged
    torch.testing.assert_close(_outputs(model), plain, atol=0, rtol=0)


def test_save_takes_the_arch_name_that_load_gives(tmp_path) -> None:
    model = _tiny_vit()
    rmtp.prune(model, "magnitude", sparsity=0.5)
    spec = rmtp.ModelSpec(name="vit_tiny_patch16_224", kwargs=dict(TINY_VIT))
    rmtp.save(model, tmp_path / "a", spec=spec, arch=rmtp.infer_architecture(model))
    loaded = rmtp.load(tmp_path / "a")
    assert loaded.arch == "vit"
    rmtp.save(loaded.model, tmp_path / "b", spec=loaded.spec, arch=loaded.arch)
    torch.testing.assert_close(_outputs(rmtp.load(tmp_path / "b").model), _outputs(model), atol=0, rtol=0)
    with pytest.raises(PluginError, match="unknown architecture 'vitt'"):
        rmtp.save(loaded.model, tmp_path / "c", spec=loaded.spec, arch="vitt")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("training", [True, False])
def test_prune_hands_the_model_back_in_the_mode_it_got(training: bool) -> None:
    model = _tiny_vit().train(training)
    model.blocks[0].eval()  # a mixed model keeps its mix
    rmtp.prune(model, "svd-mp", margin=1.0, min_dim=2, only_if_faster=False)
    from rmtp.contract.saved_types import is_replacement

    assert is_replacement(model.blocks[1].mlp.fc1)
    assert model.training is training
    assert all(not m.training for m in model.blocks[0].modules())
    assert all(m.training is training for m in model.blocks[1].modules())  # new factors included


def test_a_named_architecture_checks_the_structure_before_running_the_model() -> None:
    with pytest.raises(PluginError, match=r"^architecture 'vit' cannot handle the model: it has no blocks"):
        rmtp.prune(nn.Sequential(nn.Linear(4, 4)), "magnitude", arch="vit", sparsity=0.5)


def test_a_pruner_that_skips_every_layer_says_so_where_it_is_seen() -> None:
    """n:m on a CPU: no N:M kernel is faster, so ``only_if_faster`` keeps every layer dense. The
    reason must not live only in the note column, which a narrow table hides first."""
    model = _tiny_vit()
    calibration = DataLoader(TensorDataset(_images(), torch.zeros(3, dtype=torch.long)), batch_size=3)
    report = rmtp.prune(model, "n:m", n=2, m=4, calibration=calibration,
                        latency={"cost": "measured", "verify_rounds": 0, "rounds": 3, "block_ms": 1.0, "grid": 2},
                        device="cpu")
    assert report.stats.nonzeros == report.baseline.nonzeros
    assert report.notes[0].startswith(f"nothing pruned: all {len(report.rows)} layers skipped: kept dense: no 2:4 "
                                      f"kernel for it on cpu")
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(report)
    text = console.export_text()
    header = text.splitlines()[2]
    assert "kept" in header and "note" not in header  # the note column is hidden at this width...
    assert text.count(" skipped ") >= len(report.rows)  # ...the kept column says it, row by row
    assert "; nothing pruned (why: below)" in " ".join(text.split())  # and the before → after line


def _run_report(speedup: dict | None):
    from rmtp.reports.records import ModelStats, RunReport, StepReport

    dense = ModelStats(params=1000, nonzeros=1000, macs=4000, top1=90.0)
    final = ModelStats(params=250, nonzeros=250, macs=1000, top1=89.5, latency_ms=5.0,
                       dense_latency_ms=None if speedup is None else 8.0, speedup=speedup)
    return RunReport(recipe=None, model="m", arch="vit", seed=0, device="cpu", dense=dense,
                     steps=[StepReport(index=0, kind="evaluate", name="evaluate", rows=[], stats=final, seconds=1.0)])


def _paired(ratios: list[float], threads: int):
    from rmtp.measure.timing import PairedSpeedup, Spread

    return PairedSpeedup(dense_ms=Spread.of([8.0] * len(ratios)), pruned_ms=Spread.of([8.0 / r for r in ratios]),
                         ratio=Spread.of(ratios), batch=32, threads=threads, rounds=len(ratios))


def test_the_summary_shows_the_dense_latency_it_measured_and_a_headline() -> None:
    from rmtp.reports.render import render_report

    console = Console(width=160, record=True, file=io.StringIO())
    render_report(_run_report(_paired([1.5, 1.6, 1.55, 1.62, 1.58], threads=1).to_dict()), console)
    lines = [line.rstrip() for line in console.export_text().splitlines()]
    dense_row = next(line for line in lines if line.startswith("│ dense"))
    assert "8.00 ms" in dense_row
    assert ("result: params 1.00k → 250 (×0.25), MACs 4.00k → 1.00k (×0.25), top-1 90.00% → 89.50% (-0.50), "
            "×1.58 [1.55–1.60] speed-up at batch 32") in lines


def test_noisy_timing_advice_never_asks_for_the_setting_in_force() -> None:
    noisy = [0.6, 1.4, 0.8, 1.3, 1.0, 0.7, 1.5]
    assert "latency_threads: 1" not in _paired(noisy, threads=1).describe()
    assert "latency_threads: 1" in _paired(noisy, threads=2).describe()


def test_progress_bars_print_nothing_off_a_terminal() -> None:
    from rmtp.reports.render import RichProgress

    out = io.StringIO()
    with RichProgress(Console(file=out)).task("working", total=2) as advance:
        advance()
        advance()
    assert out.getvalue() == ""


def test_the_quickstart_comment_counts_the_epochs_it_runs() -> None:
    text = (REPO / "recipes" / "quickstart.yaml").read_text(encoding="utf-8")
    epochs = next(step["finetune"]["epochs"] for step in yaml.safe_load(text)["steps"] if "finetune" in step)
    words = {1: "one epoch", 2: "two epochs", 3: "three epochs", 4: "four epochs", 5: "five epochs"}
    comment = " ".join(line for line in text.splitlines() if line.startswith("#"))
    assert f"{words[epochs]} of distillation" in comment


def _readme_api_call(pruner: str) -> dict:
    """The keyword arguments of the README's first ``rmtp.prune(model, PRUNER, ...)`` call."""
    text = (REPO / "README.md").read_text(encoding="utf-8").split("## Python API", 1)[1]
    source = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "rmtp.prune" \
                and isinstance(node.args[1], ast.Constant) and node.args[1].value == pruner:
            return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    raise AssertionError(f"the README's Python API has no rmtp.prune(model, {pruner!r}, ...)")


def test_the_readme_svd_mp_example_plans_for_the_quickstart_batch(tmp_path) -> None:
    """The README calls its example the quickstart's svd-mp step: only_if_faster must time splits
    at the batch and threads the quickstart's recipe resolves for that step."""
    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text(encoding="utf-8"))
    raw["output"] = {"dir": str(tmp_path / "out")}
    recipe = rmtp.parse_recipe(raw, source=REPO / "recipes" / "quickstart.yaml")
    prune_index, prune = next(iter(recipe.resolved.items()))
    call = _readme_api_call(recipe.steps[prune_index].prune)
    settings = LatencySettings.model_validate(call.get("latency") or {})
    assert (settings.batch, settings.threads) == (prune.latency.batch, prune.latency.threads)
    assert call["margin"] == prune.params.margin


def test_every_api_call_reports_its_own_wall_time() -> None:
    """``report.seconds`` of a call through the API is its wall time, as a recipe step's is (it was
    0.0 outside a recipe)."""
    model = _tiny_vit()
    dense = rmtp.frozen_copy(model)
    images = DataLoader(TensorDataset(_images()), batch_size=3)
    reports = [rmtp.prune(model, "magnitude", sparsity=0.5),
               rmtp.finetune(model, images, teacher=dense, distill={"weight": 1.0}, max_steps=1),
               rmtp.reconstruct(model, images, dense=dense, steps=1)]
    assert all(report.seconds > 0 for report in reports), [report.seconds for report in reports]
