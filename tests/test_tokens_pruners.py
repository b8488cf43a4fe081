"""The token-cls, token-mean and tome pruners: params, per-block rows (tokens and MACs), and a
recipe run whose saved model comes back token-reduced."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe
from pydantic import ValidationError
from test_tokens_reference import make_vit

import rmtp
from rmtp import measure
from rmtp.contract.pruner import PruneContext
from rmtp.errors import PluginError, RecipeError
from rmtp.plugins import get_plugins
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import parse_recipe
from rmtp_plugins.tokens.patch import TokenVisionTransformer
from rmtp_plugins.tokens.schedule import keep_ratios
from rmtp_plugins.tokens.token_cls import TokenClsParams, TokenClsPruner
from rmtp_plugins.tokens.token_mean import TokenMeanParams, TokenMeanPruner
from rmtp_plugins.tokens.tome import TomeParams, TomePruner

PRUNERS = (TokenClsPruner, TokenMeanPruner, TomePruner)


@pytest.fixture
def plugins():
    """The token pruners, registered even where their entry points are not installed yet."""
    loaded = get_plugins()
    for cls in PRUNERS:
        if cls.name not in loaded.pruners:
            loaded.pruners.add(cls)
    return loaded


def _context(model: torch.nn.Module, layers=None) -> PruneContext:
    arch = get_plugins().architecture("vit")
    chosen = [layer for layer in arch.prunable_layers(model) if not layer.optional] if layers is None else layers
    return PruneContext(model=model, arch=arch, layers=chosen, device=torch.device("cpu"), seed=0)


def test_params_take_a_curve_or_a_list_not_both() -> None:
    assert TokenClsParams().r_max == 0.6 and TokenClsParams().alpha == 2.0
    assert TokenClsParams().relative_to == "current", "the seed's compounding reading is the default"
    assert TokenClsParams(keep=[1.0, 0.5]).keep == [1.0, 0.5]
    with pytest.raises(ValidationError, match="either keep"):
        TokenMeanParams(keep=[0.5, 0.5], alpha=1.5)
    with pytest.raises(ValidationError, match="either r_list"):
        TomeParams(r_list=[1, 2], r=3)
    # r_max 1 would ask the last block to keep no share at all (keep(L−1) = 1 − r_max)
    for bad in ({"r_max": 1.5}, {"r_max": 1.0}, {"alpha": 0}, {"keep": [0.0]}, {"relative_to": "first"},
                {"score_from": "reg"}, {"sparsity": 0.5}):
        with pytest.raises(ValidationError):
            TokenClsParams(**bad)


@pytest.mark.parametrize("pruner, params, expected_tokens", [
    (TokenClsPruner, TokenClsParams(r_max=0.5, alpha=1.0), [(17, 13), (13, 7)]),
    (TokenMeanPruner, TokenMeanParams(keep=[0.5, 1.0], fuse=True), [(17, 9), (9, 9)]),
    (TomePruner, TomeParams(r=5), [(17, 12), (12, 7)]),
    (TomePruner, TomeParams(r_list=[0, 3]), [(17, 17), (17, 14)]),
])
def test_rows_report_tokens_and_macs_per_block(pruner, params, expected_tokens) -> None:
    model = make_vit("plain")
    dense_macs = measure.count_macs(model, (1, 16, 16))
    rows = pruner().prune(_context(model), params).rows
    assert isinstance(model, TokenVisionTransformer)
    assert [r.layer for r in rows] == ["blocks.0", "blocks.1"]
    assert [(r.detail["tokens_in"], r.detail["tokens_out"]) for r in rows] == expected_tokens
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, args, out: seen.append((args[0].shape[1], out[0].shape[1])))
    with torch.no_grad():
        model(torch.randn(2, 1, 16, 16))
    assert seen == expected_tokens, "the rows report what the forward pass does"
    for row, (n_in, n_out) in zip(rows, expected_tokens):
        assert row.params_before == row.params_after and row.nonzeros_before == row.nonzeros_after
        assert row.kept_fraction == pytest.approx(n_out / n_in)
        reduced = n_in < 17 or n_out < n_in  # a block is cheaper if it receives or passes on fewer tokens
        assert (row.detail["macs_after"] < row.detail["macs_before"]) == reduced
        assert row.detail["macs_after"] <= row.detail["macs_before"]
    assert sum(r.detail["macs_after"] for r in rows) < sum(r.detail["macs_before"] for r in rows)
    assert measure.count_macs(model, (1, 16, 16)) < dense_macs
    if pruner is not TomePruner:
        assert [r.budget for r in rows] == (params.keep or keep_ratios(2, params.r_max, params.alpha))


def test_schedule_lists_must_fit_the_model_and_layer_filters_are_refused() -> None:
    with pytest.raises(PluginError, match="keep lists 3 ratios but the model has 2 blocks"):
        TokenClsPruner().prune(_context(make_vit("plain")), TokenClsParams(keep=[1.0, 0.5, 0.5]))
    with pytest.raises(PluginError, match="r_list lists 1 counts"):
        TomePruner().prune(_context(make_vit("plain")), TomeParams(r_list=[1]))
    model = make_vit("plain")
    some = [layer for layer in get_plugins().architecture("vit").prunable_layers(model) if "fc1" in layer.name]
    with pytest.raises(PluginError, match="act on whole blocks"):
        TomePruner().prune(_context(model, some), TomeParams())
    assert type(model).__name__ == "VisionTransformer"


def test_recipe_prunes_evaluates_and_saves_a_token_reduced_model(tmp_path: Path, plugins) -> None:
    raw = tiny_recipe([{"prune": "tome", "params": {"r": 4}}, {"evaluate": {}}], output=tmp_path / "out")
    raw["data"]["eval_limit"] = 64
    result = run_recipe(parse_recipe(raw, source=tmp_path / "r.yaml"))
    prune, evaluate = result.report.steps
    assert [row.detail["tokens_out"] for row in prune.rows] == [13, 9]
    assert prune.stats.macs < result.report.dense.macs
    assert prune.stats.attention_macs < result.report.dense.attention_macs
    assert 0 <= evaluate.stats.top1 <= 100
    loaded = rmtp.load(tmp_path / "out").model
    images = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), result.model(images), atol=0, rtol=0)

    # `rmtp token-map` draws which patches merged, from the saved folder (a command of the tokens package)
    from typer.testing import CliRunner

    import rmtp_plugins.tokens
    from rmtp.cli import build_app

    if plugins.manager.get_plugin("tokens") is None:
        plugins.manager.register(rmtp_plugins.tokens, name="tokens")
    png = tmp_path / "map.png"
    outcome = CliRunner().invoke(build_app(plugins), ["token-map", str(tmp_path / "out"), "--out", str(png), "-n", "3"])
    assert outcome.exit_code == 0, outcome.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    outcome = CliRunner().invoke(build_app(plugins), ["token-map", str(tmp_path / "missing")])
    assert outcome.exit_code == 1 and "not an rmtp model folder" in outcome.output


def test_visualize_writes_a_token_map_into_the_output_folder(tmp_path: Path, plugins) -> None:
    raw = tiny_recipe([{"prune": "token-cls", "params": {"keep": [0.5, 0.5], "visualize": 3}}],
                      output=tmp_path / "out")
    raw["data"]["eval_limit"] = 16
    result = run_recipe(parse_recipe(raw, source=tmp_path / "r.yaml"))
    png = tmp_path / "out" / "token_map-token-cls.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.report.steps[0].rows[0].note == "token map of 3 val images: token_map-token-cls.png"
    assert not list(tmp_path.glob(".out.extras.*"))  # the staging folder is gone
    raw = tiny_recipe([{"prune": "tome", "params": {"r": 2, "visualize": 2}}])  # no output folder
    result = run_recipe(parse_recipe(raw, source=tmp_path / "r2.yaml"))
    assert "no output folder" in result.report.steps[0].rows[0].note
    with pytest.raises(ValidationError, match="less than or equal to 64"):
        TomeParams(visualize=65)


def test_recipe_validation_reports_token_param_errors(tmp_path: Path, plugins) -> None:
    raw = tiny_recipe([{"prune": "token-cls", "params": {"r_max": 0.6, "keep": [0.5, 0.5]}}])
    with pytest.raises(RecipeError, match="either keep"):
        parse_recipe(raw, source=tmp_path / "r.yaml")
