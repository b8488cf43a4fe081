"""Models from where people keep them: timm's hub names, folders in timm's hub layout, bare state dicts.

Nothing here reaches the network. The hub is either unreachable on purpose (huggingface_hub's
offline mode, and an empty cache, so weights a developer downloaded cannot make a test pass) or
a local cache filled in the real layout (``models--org--name/{refs,snapshots,blobs}``) that
huggingface_hub and timm read as they would read a download. Folders in the hub layout are written
by timm's own ``save_for_hf``, as ``push_to_hf_hub`` writes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import REPO, TINY_VIT, tiny_recipe, write_recipe
from safetensors.torch import save_file
from timm.models._hub import save_for_hf
from torch import nn
from typer.testing import CliRunner

import rmtp
from rmtp import sources
from rmtp.bench import BenchError
from rmtp.bench.loading import load_candidates
from rmtp.cli import build_app
from rmtp.contract.architecture import ModelSpec
from rmtp.errors import CheckpointError, RecipeError
from rmtp.plugins import get_plugins
from rmtp.run.pipeline import build_model, run_recipe
from rmtp.run.recipe import load_recipe
from rmtp.spectral import analyze_model, analyze_state_dict
from rmtp.spectral.analysis import analyze, open_model
from rmtp.storage.saving import save

runner = CliRunner()
NAME = "vit_tiny_patch16_224"
INPUT = (3, 1, 16, 16)
REPO_ID = "someorg/tiny-vit"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def invoke(*args: str):
    return runner.invoke(build_app(), [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(NAME, **TINY_VIT).eval()


def same_logits(left: nn.Module, right: nn.Module) -> bool:
    x = torch.randn(INPUT, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return torch.equal(left.eval()(x), right.eval()(x))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A folder in timm's hub layout (config.json + model.safetensors) and the model that wrote it."""
    model = tiny_vit(seed=3)
    folder = tmp_path_factory.mktemp("hub") / "tiny-vit"
    save_for_hf(model, folder, safe_serialization=True)
    return folder, model


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub in offline mode with an empty cache of its own (returned). It reads the
    environment at import time, so its module constants are set too (as tests/test_architectures.py
    does); subprocesses get the environment."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_repo(cache: Path, repo: str, model: nn.Module) -> None:
    """``repo`` in huggingface_hub's cache layout, as a download leaves it: files in ``blobs/`` by
    hash, ``snapshots/<commit>/`` linking to them, ``refs/main`` naming the commit."""
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    staging, blobs, snapshot = root / "staging", root / "blobs", root / "snapshots" / COMMIT
    save_for_hf(model, staging, safe_serialization=True)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(staging.iterdir()):
        blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
        file.rename(blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    staging.rmdir()
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)


def recipe_file(tmp_path: Path, model: dict, output: Path | None = None) -> Path:
    recipe = tiny_recipe([{"evaluate": {}}], output=output)
    recipe["model"] = model
    return write_recipe(tmp_path / "recipe.yaml", recipe)


# --------------------------------------------------------------------------- hub-layout folders


def test_the_config_decides_name_and_kwargs(written: tuple[Path, nn.Module]) -> None:
    folder, _ = written
    hub = sources.hub_folder(folder)
    assert hub is not None and hub.weights == folder / "model.safetensors"
    assert hub.config.architecture == NAME
    kwargs = hub.config.kwargs
    for key, value in TINY_VIT.items():
        expected = [value, value] if key == "img_size" else value
        assert kwargs[key] == expected, key
    # the input size (and greyscale normalisation) in pretrained_cfg differ from timm's defaults
    assert kwargs["pretrained_cfg_overlay"]["input_size"] == [1, 16, 16]
    assert sources.hub_folder(folder / "model.safetensors") == hub


@pytest.mark.parametrize("checkpoint", ["tiny-vit", "tiny-vit/model.safetensors"])
def test_hub_folder_in_a_recipe_without_a_name(written: tuple[Path, nn.Module], checkpoint: str) -> None:
    folder, source = written
    recipe = load_recipe(recipe_file(folder.parent, {"checkpoint": checkpoint}))
    assert recipe.model.name == NAME and recipe.model.checkpoint == folder / "model.safetensors"
    assert recipe.model.kwargs["num_classes"] == 10
    model, spec, _, arch = build_model(recipe, recipe.plugins)
    assert arch.name == "vit" and spec.name == NAME
    assert same_logits(model, source)
    assert same_logits(model, tiny_vit(seed=3)) and not same_logits(model, tiny_vit(seed=4))  # the check can fail


def test_hub_folder_recipe_validates_runs_and_saves(written: tuple[Path, nn.Module], tmp_path: Path) -> None:
    folder, source = written
    path = recipe_file(tmp_path, {"checkpoint": str(folder)}, output=tmp_path / "out")
    result = invoke("validate", path)
    assert result.exit_code == 0, result.output
    assert f"ok {path}: {NAME}" in result.output
    run = run_recipe(load_recipe(path))
    assert same_logits(run.dense_model, source)
    loaded = rmtp.load(tmp_path / "out")
    assert loaded.spec.name == NAME and same_logits(loaded.model, source)
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert saved["model"]["name"] == NAME and saved["model"]["checkpoint"] == str(folder / "model.safetensors")


def test_hub_folder_name_must_agree_with_its_config(written: tuple[Path, nn.Module], tmp_path: Path) -> None:
    folder, _ = written
    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe_file(tmp_path, {"name": "resnet18", "checkpoint": str(folder)}))
    [problem] = exc.value.problems
    assert "model.name: 'resnet18'" in problem and f"says the weights are a '{NAME}'" in problem
    # the same architecture by name is fine, and recipe kwargs override the config's
    recipe = load_recipe(recipe_file(tmp_path, {"name": NAME, "checkpoint": str(folder), "kwargs": {"drop_rate": 0.1}}))
    assert recipe.model.kwargs["drop_rate"] == 0.1 and recipe.model.kwargs["embed_dim"] == 32


def test_plain_folder_and_missing_name_are_one_problem_each(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe_file(tmp_path, {"checkpoint": "plain"}))
    [problem] = exc.value.problems
    assert "not an rmtp output folder (no rmtp_model.json) nor in timm's hub layout (no config.json)" in problem
    bare = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2, 2)}, str(bare))
    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe_file(tmp_path, {"checkpoint": "w.safetensors"}))
    [problem] = exc.value.problems
    assert "model.name: required, unless model.checkpoint is a folder in timm's hub layout" in problem
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"architecture": NAME}))
    assert "has timm's config.json but no weights file" in one_error_line(invoke("analyze-spectrum",
                                                                                tmp_path / "noweights"))


def test_rmtp_folder_is_not_taken_for_a_hub_folder(tmp_path: Path) -> None:
    spec = ModelSpec(name=NAME, kwargs=dict(TINY_VIT))
    arch = get_plugins().architecture_for(NAME)
    model = arch.create(spec)
    folder = save(model, tmp_path / "run", spec=spec, arch=arch, baseline=spec)
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 3}))
    assert open_model(str(folder)).kind == "folder"
    [_, pruned] = load_candidates([str(folder)])
    assert pruned.kind == "folder" and same_logits(pruned.model, model)
    recipe = load_recipe(recipe_file(tmp_path, {"checkpoint": "run"}))  # the name comes from rmtp_model.json
    assert recipe.model.name == NAME and recipe.model.checkpoint == folder


def test_pytorch_model_bin_layout(tmp_path: Path) -> None:
    source = tiny_vit(seed=5)
    folder = tmp_path / "bin-only"
    save_for_hf(source, folder, safe_serialization=False)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin"]
    opened = open_model(str(folder))
    assert opened.spec.checkpoint == folder / "pytorch_model.bin" and same_logits(opened.model, source)
    [candidate] = load_candidates([str(folder)])
    assert same_logits(candidate.model, source)


class _WritesMarker:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, creating the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pytorch_model_bin_runs_nothing(written: tuple[Path, nn.Module], tmp_path: Path) -> None:
    folder, source = written
    payload = {**source.state_dict(), "evil": _WritesMarker(tmp_path / "unused")}
    # Control: the payload is live; an unrestricted load really does create its marker.
    control_marker = tmp_path / "control-marker"
    torch.save({**payload, "evil": _WritesMarker(control_marker)}, tmp_path / "control.bin")
    torch.load(tmp_path / "control.bin", map_location="cpu", weights_only=False)
    assert control_marker.exists()

    evil, marker = tmp_path / "evil", tmp_path / "marker"
    evil.mkdir()
    shutil.copy(folder / "config.json", evil / "config.json")
    torch.save({**payload, "evil": _WritesMarker(marker)}, evil / "pytorch_model.bin")
    recipe = load_recipe(recipe_file(tmp_path, {"checkpoint": "evil"}))
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        build_model(recipe, recipe.plugins)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        open_model(str(evil))
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_candidates([str(evil)])
    for command in ("analyze-spectrum", "bench"):
        assert "refused to unpickle" in one_error_line(invoke(command, evil))
    assert not marker.exists()


def test_analyze_spectrum_of_a_hub_folder(written: tuple[Path, nn.Module], tmp_path: Path) -> None:
    folder, source = written
    result = invoke("analyze-spectrum", folder, "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    assert f"model from {folder / 'config.json'}: {NAME}" in result.output
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["kind"] == "checkpoint" and report["model"]["name"] == NAME and report["model"]["arch"] == "vit"
    names = [row["name"] for row in report["layers"]]
    assert "blocks.0.attn.qkv[q]" in names and "blocks.1.mlp.fc2" in names
    assert same_logits(open_model(str(folder)).model, source)
    # the same weights named by timm's config beside the file
    assert [r.name for r in analyze(str(folder / "model.safetensors")).layers] == names
    assert "drop --model" in one_error_line(invoke("analyze-spectrum", folder, "--model", "resnet18"))


def test_bench_of_a_hub_folder(written: tuple[Path, nn.Module]) -> None:
    folder, source = written
    [candidate] = load_candidates([str(folder)])
    assert candidate.kind == "checkpoint" and candidate.timm_name == NAME and candidate.arch == "vit"
    assert same_logits(candidate.model, source)
    result = invoke("bench", folder, folder / "model.safetensors", "--batch", "1", "--rounds", "3")
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- timm's hub names


def test_timm_repo_names_read_as_registry_tags() -> None:
    assert sources.normalise_name(f"timm/{NAME}.augreg_in21k") == f"{NAME}.augreg_in21k"
    assert sources.normalise_name(f"timm/{NAME}") == f"hf-hub:timm/{NAME}"  # no tag: the repo itself
    assert sources.normalise_name("timm/not_a_model.x") == "hf-hub:timm/not_a_model.x"
    assert sources.normalise_name(f"{NAME}.augreg_in21k") == f"{NAME}.augreg_in21k"
    assert sources.is_hub_name("hf-hub:org/x") and sources.is_hub_name("hf_hub:org/x")
    assert not sources.is_hub_name(NAME) and not sources.is_hub_name("hf-hub:")


def test_timm_repo_name_in_a_recipe(tmp_path: Path, offline: Path) -> None:
    recipe = load_recipe(recipe_file(tmp_path, {"name": f"timm/{NAME}.augreg_in21k", "kwargs": dict(TINY_VIT)}))
    assert recipe.model.name == f"{NAME}.augreg_in21k"
    _, spec, _, arch = build_model(recipe, recipe.plugins)
    assert arch.name == "vit" and spec.name == f"{NAME}.augreg_in21k"
    pretrained = load_recipe(recipe_file(tmp_path, {"name": f"timm/{NAME}.augreg_in21k", "pretrained": True}))
    with pytest.raises(CheckpointError) as exc:
        build_model(pretrained, pretrained.plugins)
    message = str(exc.value)
    assert "\n" not in message and "needs network access" in message
    assert f"hf download timm/{NAME}.augreg_in21k --local-dir DIR" in message and "model.checkpoint: DIR" in message


def test_hf_hub_name_offline_is_one_problem(tmp_path: Path, offline: Path) -> None:
    path = recipe_file(tmp_path, {"name": "hf-hub:someorg/not-here", "pretrained": True})
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    [problem] = exc.value.problems
    assert problem.startswith(f"{path}: model.name: could not read 'hf-hub:someorg/not-here''s config.json")
    assert "needs network access to the Hugging Face hub (repo someorg/not-here)" in problem
    assert "model.checkpoint: DIR" in problem and "\n" not in problem
    lines = [line for line in invoke("validate", path).output.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs network access" in lines[0]


@pytest.mark.parametrize("args", [
    ["analyze-spectrum", "timm:hf-hub:someorg/not-here"],
    ["analyze-spectrum", "hf-hub:someorg/not-here", "--pretrained"],
    ["analyze-spectrum", f"timm:{NAME}", "--pretrained"],
    ["bench", "timm:hf-hub:someorg/not-here", "--batch", "1"],
    ["bench", "hf-hub:someorg/not-here", "--batch", "1"],
], ids=["spectrum-timm-prefix", "spectrum-bare-prefix", "spectrum-pretrained-tag", "bench-timm-prefix",
        "bench-bare-prefix"])
def test_hub_names_offline_are_one_line_exit_1(args: list[str], offline: Path) -> None:
    line = one_error_line(invoke(*args))
    assert "needs network access to the Hugging Face hub" in line and "--local-dir DIR" in line
    assert f"rmtp {args[0]} DIR" in line or "rmtp analyze-spectrum DIR / rmtp bench DIR" in line


def test_hub_name_offline_from_a_fresh_process(tmp_path: Path) -> None:
    """The environment alone (read when huggingface_hub is imported), as a user sets it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "rmtp", "analyze-spectrum", "hf-hub:someorg/not-here"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
    assert done.returncode == 1, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "needs network access" in lines[0] and "Traceback" not in done.stderr


def test_cached_hf_hub_repo_loads_through_timm(tmp_path: Path, offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    source = tiny_vit(seed=9)
    cache_repo(offline, REPO_ID, source)
    name = f"hf-hub:{REPO_ID}"
    assert sources.registry_name(name) == NAME

    # a recipe: validated (the plugin chosen from the cached config.json), built by timm with the weights
    path = recipe_file(tmp_path, {"name": name, "pretrained": True}, output=tmp_path / "out")
    assert invoke("validate", path).exit_code == 0
    recipe = load_recipe(path)
    model, spec, baseline, arch = build_model(recipe, recipe.plugins)
    assert arch.name == "vit" and same_logits(model, source)
    assert spec.name == NAME and spec.kwargs["embed_dim"] == 32 and baseline.name == name and baseline.pretrained
    run_recipe(recipe)

    # analyze-spectrum and bench, through the same loader
    opened = open_model(name, pretrained=True)
    assert opened.arch.name == "vit" and same_logits(opened.model, source)
    result = invoke("analyze-spectrum", name, "--pretrained")
    assert result.exit_code == 0, result.output
    assert "blocks.0.attn.qkv[q]" in result.output
    [candidate] = load_candidates([f"timm:{name}"])
    assert candidate.arch == "vit" and candidate.timm_name == name

    # the pruned folder records the architecture, so it loads with the hub cache gone
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    loaded = rmtp.load(tmp_path / "out")
    assert loaded.spec.name == NAME and loaded.baseline.name == name and same_logits(loaded.model, source)


def test_cached_hub_repo_naming_an_unknown_architecture(tmp_path: Path, offline: Path) -> None:
    cache_repo(offline, "someorg/future", tiny_vit())
    snapshot = offline / "models--someorg--future" / "snapshots" / COMMIT / "config.json"
    config = json.loads(snapshot.read_text())
    config["architecture"] = "vit_from_the_future"
    blob = snapshot.resolve()
    blob.write_text(json.dumps(config))
    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe_file(tmp_path, {"name": "hf-hub:someorg/future", "arch": "vit"}))
    assert any("'vit_from_the_future' (its config.json's architecture), which this timm does not have" in p
               for p in exc.value.problems)


# --------------------------------------------------------------------------- bare state dicts


def _expected_rows(state_dict: dict[str, torch.Tensor], split: bool = True) -> list[str]:
    names = []
    for key, value in state_dict.items():
        if value.ndim not in (2, 4):
            continue
        if split and "qkv" in key and value.shape[0] % 3 == 0:
            names += [f"{key}[q]", f"{key}[k]", f"{key}[v]"]
        else:
            names.append(key)
    return names


def test_bare_state_dict_is_analysed_by_key(tmp_path: Path) -> None:
    source = tiny_vit(seed=2)
    state_dict = source.state_dict()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    report = analyze(str(path))
    assert report.kind == "state-dict" and report.spec is None and report.arch is None
    assert sorted(row.name for row in report.layers) == sorted(_expected_rows(state_dict))
    rows = {row.name: row for row in report.layers}
    assert "blocks.0.attn.qkv.weight[k]" in rows and rows["blocks.0.attn.qkv.weight[k]"].shape == (32, 32)
    assert rows["patch_embed.proj.weight"].skipped.startswith("one input channel per filter")  # in_chans 1
    assert rows["head.weight"].skipped.startswith("too small")
    assert "no architecture known" in report.notes[0]
    # the same fit as the architecture-aware analysis of the same weights
    by_module = {row.name: row for row in analyze_model(source, get_plugins().architecture("vit"))}
    for key, module in (("blocks.0.attn.qkv.weight[v]", "blocks.0.attn.qkv[v]"),
                        ("blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc1")):
        assert rows[key].fit == by_module[module].fit, key
    data = report.to_dict()
    assert data["model"]["name"] is None and data["model"]["checkpoint"] == str(path)


def test_bare_state_dict_on_the_command_line(tmp_path: Path) -> None:
    source = tiny_vit(seed=2)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    result = invoke("analyze-spectrum", path, "--csv", tmp_path / "s.csv")
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "no architecture known" in output and "layers are named by their state-dict keys" in output
    assert "blocks.0.attn.qkv.weight[q]" in output and f"state dict {path}" in output
    result = invoke("analyze-spectrum", path, "--no-split-qkv", "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    names = [row["name"] for row in json.loads((tmp_path / "s.json").read_text())["layers"]]
    assert sorted(names) == sorted(_expected_rows(source.state_dict(), split=False))
    assert "qkv as one matrix" in result.output
    assert "which timm model is this checkpoint" in one_error_line(invoke("analyze-spectrum", path, "--kwargs",
                                                                          "depth=2"))


def test_bare_state_dict_skips_what_it_can_recognise() -> None:
    generator = torch.Generator().manual_seed(0)
    state_dict = {
        "stem.weight": torch.randn(64, 3, 3, 3, generator=generator),    # 64 × 27: too small
        "dw.weight": torch.randn(64, 1, 7, 7, generator=generator),      # depthwise
        "pw.weight": torch.randn(128, 64, 1, 1, generator=generator),    # analysed as 128 × 64
        "fc.weight": torch.randn(96, 64, generator=generator),
        "fc.bias": torch.randn(96, generator=generator),                 # not a matrix: not listed
        "mixer.qkv.weight": torch.randn(100, 64, generator=generator),   # 100 rows: not split
        "index": torch.zeros(64, 64, dtype=torch.long),                  # not weights: not listed
    }
    rows = {row.name: row for row in analyze_state_dict(state_dict)}
    assert list(rows) == ["stem.weight", "dw.weight", "pw.weight", "fc.weight", "mixer.qkv.weight"]
    assert rows["stem.weight"].skipped.startswith("too small") and rows["dw.weight"].skipped
    assert rows["pw.weight"].fit is not None and rows["pw.weight"].shape == (128, 64)
    assert rows["mixer.qkv.weight"].fit is not None and rows["mixer.qkv.weight"].rows is None


def test_bench_still_needs_a_name_for_a_bare_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit().state_dict().items()}, str(path))
    with pytest.raises(BenchError, match=r"which timm model is it\?.*or timm's config.json"):
        load_candidates([str(path)])
