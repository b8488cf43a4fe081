"""The plugin system: entry-point discovery, blocking, strict registries, third-party plugins end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_recipe, write_recipe
from typer.testing import CliRunner

from rmtp.cli import build_app
from rmtp.contract import hookspecs
from rmtp.contract.pruner import Pruner, PrunerParams
from rmtp.errors import PluginError, RecipeError
from rmtp.plugins import Registry, get_plugins, load_plugins, reset_plugins
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import load_recipe

THROWAWAY = '''
"""A third-party rmtp plugin, as a user would ship it: a pruner, and a CLI command."""
import torch
from pydantic import Field
from rmtp import hookimpl
from rmtp.contract.architecture import Architecture
from rmtp.contract.pruner import LayerRow, Pruner, PrunerParams, weight_footprint


class FirstRowsParams(PrunerParams):
    rows: int = Field(1, ge=1, description="leading output rows to zero")


class FirstRowsPruner(Pruner):
    name = "{name}"
    description = "Zeroes the first output rows of every selected layer (test plugin)."
    kind = "mask"
    Params = FirstRowsParams

    def prune(self, ctx, params):
        rows = []
        for layer in ctx.layers:
            module = ctx.module(layer)
            shape, n, nz = weight_footprint(module)
            with torch.no_grad():
                module.weight[: params.rows] = 0
            _, n_after, nz_after = weight_footprint(module)
            rows.append(LayerRow(layer.name, shape, shape, n, n_after, nz, nz_after))
        return rows


@hookimpl
def register_pruners(register):
    register(FirstRowsPruner)


class ToyArchitecture(Architecture):
    name = "{name}-arch"
    description = "Covers no real model (test plugin)."
    model_patterns = ("{name}_*",)

    def prunable_layers(self, model):
        return []


@hookimpl
def register_architectures(register):
    register(ToyArchitecture)


@hookimpl
def register_commands(app):
    @app.command("hello-{name}")
    def hello():
        """Say hello from a plugin."""
        print("hello from {name}")
'''


def install_plugin(root: Path, monkeypatch: pytest.MonkeyPatch, *, entry: str, module: str, pruner_name: str) -> None:
    """Install a plugin the way pip would: a module plus a dist-info folder with an rmtp entry point."""
    (root / f"{module}.py").write_text(THROWAWAY.replace("{name}", pruner_name))
    dist = root / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[rmtp]\n{entry} = {module}\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, module, raising=False)
    reset_plugins()


def test_builtins_are_registered_through_entry_points() -> None:
    plugins = get_plugins()
    assert {"vit", "convnext", "resnet"} <= set(plugins.architectures)
    assert "magnitude" in plugins.pruners
    assert {"vit", "convnext", "resnet", "magnitude"} <= {name for name, _ in plugins.manager.list_name_plugin()}


def test_third_party_pruner_runs_from_a_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(tmp_path, monkeypatch, entry="firstrows", module="rmtp_test_firstrows", pruner_name="first-rows")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        [{"prune": "first-rows", "params": {"rows": 2}, "layers": ["blocks.*.mlp.fc1"]}]))
    assert "first-rows-arch" in get_plugins().architectures
    result = run_recipe(load_recipe(recipe))
    rows = result.report.steps[0].rows
    assert [r.layer for r in rows] == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    for row in rows:
        weight = result.model.get_submodule(row.layer).weight
        assert torch.count_nonzero(weight[:2]) == 0 and torch.count_nonzero(weight[2:]) > 0
        assert row.nonzeros_before - row.nonzeros_after == 2 * weight.shape[1]


def test_third_party_command_is_added_to_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(tmp_path, monkeypatch, entry="cmd", module="rmtp_test_cmd", pruner_name="cmd-pruner")
    result = CliRunner().invoke(build_app(), ["hello-cmd-pruner"])
    assert result.exit_code == 0 and "hello from cmd-pruner" in result.output


def test_blocked_plugin_is_not_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(tmp_path, monkeypatch, entry="blockme", module="rmtp_test_blockme", pruner_name="block-me")
    assert "block-me" in get_plugins().pruners
    monkeypatch.setenv("RMTP_DISABLE_PLUGINS", "blockme, magnitude")
    monkeypatch.delitem(sys.modules, "rmtp_test_blockme")
    reset_plugins()
    plugins = get_plugins()
    assert "block-me" not in plugins.pruners and "magnitude" not in plugins.pruners
    assert "rmtp_test_blockme" not in sys.modules  # blocked before import: its code never ran
    with pytest.raises(RecipeError, match=r"steps\[0\].prune: unknown pruner 'block-me'"):
        load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe([{"prune": "block-me"}])))


def test_token_map_survives_blocking_tome(monkeypatch: pytest.MonkeyPatch) -> None:
    """`rmtp token-map` serves every token pruner, so the tokens package registers it, not tome."""
    monkeypatch.setenv("RMTP_DISABLE_PLUGINS", "tome")
    reset_plugins()
    plugins = get_plugins()
    assert "tome" not in plugins.pruners and {"token-cls", "token-mean"} <= set(plugins.pruners)
    result = CliRunner().invoke(build_app(plugins), ["token-map", "--help"])
    assert result.exit_code == 0 and "--out" in result.output, result.output
    assert "token-map" not in CliRunner().invoke(build_app(load_plugins(disabled=["tokens"])), ["--help"]).output
    reset_plugins()


def test_duplicate_pruner_name_names_both_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(tmp_path, monkeypatch, entry="dup", module="rmtp_test_dup", pruner_name="magnitude")
    with pytest.raises(PluginError, match=r"two pruners are registered as 'magnitude': .*MagnitudePruner and "
                                          r"rmtp_test_dup.FirstRowsPruner|two pruners are registered as 'magnitude': "
                                          r"rmtp_test_dup.FirstRowsPruner and .*MagnitudePruner"):
        load_plugins(disabled=[])
    assert "magnitude" in load_plugins(disabled=["dup"]).pruners  # blocking one resolves the clash


def test_broken_plugin_names_its_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rmtp_test_broken.py").write_text("raise ImportError('missing dependency foo')\n")
    dist = tmp_path / "rmtp_test_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rmtp_test_broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rmtp]\nbroken = rmtp_test_broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"plugin 'broken' \(rmtp_test_broken\) failed to load: ImportError: "
                                          r"missing dependency foo; block it with RMTP_DISABLE_PLUGINS=broken"):
        load_plugins(disabled=[])


def test_misspelt_hook_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rmtp_test_typo.py").write_text(
        "from rmtp import hookimpl\n@hookimpl\ndef register_pruner(register):\n    pass\n")
    dist = tmp_path / "rmtp_test_typo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rmtp_test_typo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rmtp]\ntypo = rmtp_test_typo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="register_pruner"):
        load_plugins(disabled=[])


class _Params(PrunerParams):
    pass


def _pruner(name: str, description: str = "d") -> type[Pruner]:
    return type("P_" + name.replace("-", "_"), (Pruner,), {"name": name, "description": description, "kind": "mask",
                                                            "Params": _Params, "prune": lambda self, ctx, p: []})


def test_a_pruner_returns_a_prune_result_or_a_list_of_rows() -> None:
    """A plain list of rows (the contract's first return type) still works; a result passes as it
    is; anything else is refused in one line naming the pruner."""
    from rmtp.contract.pruner import LayerRow, PruneResult

    row = LayerRow("a", (2, 2), (2, 2), 4, 4, 4, 2)
    assert PruneResult.of([row]) == PruneResult([row], None)
    result = PruneResult([row], {"predicted_speedup": 1.5})
    assert PruneResult.of(result) is result
    with pytest.raises(PluginError, match=r"^mine\.prune returned NoneType; a pruner returns a PruneResult or a "
                                          r"list of LayerRow"):
        PruneResult.of(None, "mine")


def test_registry_is_strict_and_helpful() -> None:
    registry: Registry[Pruner] = Registry("pruner", Pruner)
    for name in ("svd-mp", "n:m", "token-cls", "token-mean", "tome"):
        registry.add(_pruner(name))
    with pytest.raises(PluginError, match=r"unknown pruner 'token_cls'; known: token-cls, token-mean, "):
        registry.get("token_cls")
    with pytest.raises(PluginError, match="no `name`"):
        registry.add(_pruner(""))
    with pytest.raises(PluginError, match="no one-line `description`"):
        registry.add(_pruner("x", description=""))
    with pytest.raises(PluginError, match="not a subclass of Pruner"):
        registry.add(int)  # type: ignore[arg-type]


@pytest.mark.parametrize("hook", sorted(n for n in dir(hookspecs) if n.startswith("register_")))
def test_every_hook_is_tested_and_documented(hook: str) -> None:
    """datasette's habit: a hook without a test and a README entry fails here."""
    tests = "".join(p.read_text() for p in (REPO / "tests").glob("test_*.py") if p.name != "test_plugins.py")
    tests += THROWAWAY
    assert f"def {hook}(" in tests, f"no test implements the hook {hook}"
    assert f"`{hook}" in (REPO / "README.md").read_text(), f"README.md does not document the hook {hook}"
