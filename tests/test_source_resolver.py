"""One resolver says where a model comes from (:mod:`rmtp.sources`), and every command asks it.

Each kind is resolved once here (a timm name, an rmtp output folder, a folder in timm's hub layout,
a bare weights file with a card, a config.json or nothing beside it), built for real and on the
meta device; the one card reader reads both card shapes rmtp has written (analyze-spectrum's
``timm_name``/``kwargs``/``arch``, bench's with ``data`` and the training record); the one saved-data
reader gives export, bench and token-map the same spec. Then each command and the recipe are shown
to go through it, by counting calls. Tiny models, no network, no training.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_VIT, tiny_recipe, write_recipe
from safetensors.torch import save_file
from test_model_sources import same_logits, tiny_vit
from timm.models._hub import save_for_hf
from torch import nn

import rmtp
from rmtp import sources
from rmtp.bench import BenchError
from rmtp.bench.loading import load_candidates
from rmtp.contract.architecture import ModelSpec
from rmtp.errors import CheckpointError, RecipeError, RmtpError
from rmtp.plugins import get_plugins
from rmtp.run.recipe import load_recipe
from rmtp.sources import resolve as resolver
from rmtp.spectral.analysis import open_model

NAME = "vit_tiny_patch16_224"
INPUT = (2, 1, 16, 16)
DATA = {"name": "digits", "img_size": 16, "eval_limit": 32, "val_fraction": 0.25}




def write_weights(path: Path, model: nn.Module, card: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    if card is not None:
        path.with_suffix(".json").write_text(json.dumps(card))
    return path


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_vit(seed=11)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, model: nn.Module) -> Path:
    """An rmtp output folder with a saved recipe whose data has no split_seed (the run's seed is used)."""
    spec = ModelSpec(name=NAME, kwargs=dict(TINY_VIT))
    arch = get_plugins().architecture_for(NAME)
    recipe = {"model": {"name": NAME, "kwargs": dict(TINY_VIT)}, "seed": 5, "data": dict(DATA)}
    return rmtp.save(model, tmp_path_factory.mktemp("saved") / "run", spec=spec, arch=arch, baseline=spec,
                     recipe=recipe)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, model: nn.Module) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "tiny-vit"
    save_for_hf(model, folder, safe_serialization=True)
    return folder


# --------------------------------------------------------------------------- each kind, once


def test_a_timm_name_in_every_spelling() -> None:
    for text in (f"timm:{NAME}", f"timm: {NAME} "):
        source = sources.resolve_source(text, kwargs=TINY_VIT)
        assert isinstance(source, sources.TimmName) and source.kind == "timm"
        assert source.spec == ModelSpec(name=NAME, kwargs=dict(TINY_VIT)) and source.given_name == NAME
    tagged = sources.resolve_source(f"timm:timm/{NAME}.augreg_in21k")
    assert tagged.spec.name == f"{NAME}.augreg_in21k"  # timm's repo name read as the registry tag
    hub_name = sources.resolve_source("hf-hub:someorg/tiny", pretrained=True)  # resolved without the network
    assert isinstance(hub_name, sources.TimmName) and hub_name.spec.name == "hf-hub:someorg/tiny"
    assert hub_name.spec.pretrained and hub_name.data() is None
    with pytest.raises(sources.MissingName):
        sources.resolve_source("timm:  ")
    built = sources.resolve_source(f"timm:{NAME}", kwargs=TINY_VIT).build()
    assert built.arch.name == "vit" and built.spec.name == NAME and not built.model.training


def test_an_rmtp_folder(saved: Path, model: nn.Module) -> None:
    source = sources.resolve_source(saved)
    assert isinstance(source, sources.SavedFolder) and source.kind == "saved"
    assert source.spec.name == NAME and source.spec.arch == "vit" and source.architecture().name == "vit"
    built = source.build()
    assert same_logits(built.model, model) and built.baseline.name == NAME
    structure, arch = source.build_meta()
    assert arch.name == "vit" and {p.device.type for p in structure.parameters()} == {"meta"}
    data = source.data()
    assert data.spec.name == "digits" and data.seed == 5 == data.spec.split_seed and data.spec.eval_limit == 32
    assert data.source == str(saved / "recipe.yaml")
    # a config.json dropped into it does not make it a hub folder: rmtp_model.json is looked at first
    (saved / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
    try:
        assert isinstance(sources.resolve_source(str(saved)), sources.SavedFolder)
    finally:
        (saved / "config.json").unlink()


def test_a_hub_layout_folder_and_its_weights_file(hub: Path, model: nn.Module) -> None:
    for text in (hub, hub / "model.safetensors"):
        source = sources.resolve_source(text, kwargs={"drop_rate": 0.0})
        assert isinstance(source, sources.HubLayout) and source.kind == "hub"
        assert source.spec.name == NAME and source.spec.checkpoint == hub / "model.safetensors"
        assert source.spec.kwargs["embed_dim"] == 32 and source.spec.kwargs["drop_rate"] == 0.0
        assert same_logits(source.build().model, model)
    structure, _ = sources.resolve_source(hub).build_meta()
    assert {p.device.type for p in structure.parameters()} == {"meta"}
    assert sources.resolve_source(hub, model_name=f"{NAME}.augreg_in21k").spec.name == NAME  # same architecture
    with pytest.raises(sources.NameConflict) as exc:
        sources.resolve_source(hub, model_name="resnet18")
    assert exc.value.given == "resnet18" and exc.value.hub.config.architecture == NAME
    with pytest.raises(sources.PretrainedAndWeights):
        sources.resolve_source(hub, pretrained=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_weights_file_named_by_its_card(tmp_path: Path, model: nn.Module, suffix: str) -> None:
    card = {"timm_name": NAME, "kwargs": TINY_VIT, "data": {**DATA, "root": None, "train_images": 9}, "seed": 3}
    path = write_weights(tmp_path / f"w{suffix}", model, card)
    source = sources.resolve_source(path)
    assert isinstance(source, sources.WeightsFile) and source.kind == "weights"
    assert source.spec == ModelSpec(name=NAME, kwargs=dict(TINY_VIT), checkpoint=path)
    assert same_logits(source.build().model, model)
    data = source.data()  # keys a DataSpec lacks (train_images) dropped; the card's seed splits
    assert data.spec.name == "digits" and data.seed == 3 and data.source == str(tmp_path / "w.json")
    # the given name wins; a card naming the same model adds its kwargs (under the given ones)
    same = sources.resolve_source(path, NAME, kwargs={"drop_rate": 0.0})
    assert same.card is not None and same.spec.kwargs == {**TINY_VIT, "drop_rate": 0.0}
    other = sources.resolve_source(path, "resnet18", kwargs={"num_classes": 3})
    assert other.card is None and other.ignored_card.timm_name == NAME
    assert other.spec.kwargs == {"num_classes": 3} and other.data() is None


def test_a_weights_file_with_a_config_or_nothing_beside_it(tmp_path: Path, hub: Path, model: nn.Module) -> None:
    bare = write_weights(tmp_path / "bare" / "w.safetensors", model)
    source = sources.resolve_source(bare)
    assert isinstance(source, sources.WeightsFile) and source.spec is None and source.data() is None
    assert set(source.state_dict()) == set(model.state_dict())
    with pytest.raises(CheckpointError, match="which timm model"):
        source.build()
    (bare.parent / "config.json").write_text((hub / "config.json").read_text())
    beside = sources.resolve_source(bare)
    assert isinstance(beside, sources.HubLayout) and beside.spec.checkpoint == bare
    assert same_logits(beside.build().model, model)
    named = sources.resolve_source(bare, NAME, kwargs=TINY_VIT)  # a given name: the config is not read
    assert isinstance(named, sources.WeightsFile) and named.spec.kwargs == TINY_VIT


def test_what_is_not_a_source(tmp_path: Path, model: nn.Module) -> None:
    with pytest.raises(sources.SourceNotFound):
        sources.resolve_source(tmp_path / "missing.safetensors")
    with pytest.raises(sources.NotASource):
        sources.resolve_source(tmp_path)
    path = write_weights(tmp_path / "w.safetensors", model)
    with pytest.raises(sources.PretrainedAndWeights):
        sources.resolve_source(path, NAME, pretrained=True)
    assert all(issubclass(cls, CheckpointError) for cls in (sources.SourceNotFound, sources.NotASource,
                                                           sources.NameConflict, sources.MissingName))


def test_a_pickle_is_only_read_as_weights(tmp_path: Path, model: nn.Module) -> None:
    class WritesMarker:
        def __reduce__(self):
            return (open, (str(tmp_path / "marker"), "w"))

    path = tmp_path / "evil.pth"
    torch.save({**model.state_dict(), "evil": WritesMarker()}, path)
    path.with_suffix(".json").write_text(json.dumps({"timm_name": NAME, "kwargs": TINY_VIT}))
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        sources.resolve_source(path).build()
    assert not (tmp_path / "marker").exists()


def test_settled_specs_map_to_their_kind(saved: Path, tmp_path: Path) -> None:
    assert isinstance(sources.source_for_spec(ModelSpec(name=NAME)), sources.TimmName)
    assert isinstance(sources.source_for_spec(ModelSpec(name=NAME, checkpoint=saved)), sources.SavedFolder)
    (tmp_path / "w.json").write_text(json.dumps({"timm_name": "resnet18"}))  # never read for a settled spec
    weights = sources.source_for_spec(ModelSpec(name=NAME, kwargs={"a": 1}, checkpoint=tmp_path / "w.safetensors"))
    assert isinstance(weights, sources.WeightsFile) and weights.card is None and weights.spec.kwargs == {"a": 1}


# --------------------------------------------------------------------------- the one card reader


def test_both_card_shapes_and_the_reference_cards(tmp_path: Path) -> None:
    spectrum = tmp_path / "spectrum.json"  # what analyze-spectrum documented: timm_name, kwargs, arch
    spectrum.write_text(json.dumps({"timm_name": NAME, "kwargs": TINY_VIT, "arch": "vit"}))
    card = sources.read_card(spectrum)
    assert (card.timm_name, card.kwargs, card.arch, card.data) == (NAME, TINY_VIT, "vit", None)
    assert card.saved_data() is None
    no_kwargs = tmp_path / "no-kwargs.json"
    no_kwargs.write_text(json.dumps({"timm_name": NAME, "kwargs": None}))
    assert sources.read_card(no_kwargs).kwargs == {}
    for stem in ("digits_vit", "digits_resnet"):  # what bench read: a training script's card, with data
        card = sources.read_card(REPO / "models" / f"{stem}.json")
        assert card.kwargs["num_classes"] == 10 and card.arch is None
        data = card.saved_data()
        assert data.spec.name == "digits" and data.seed == 0 and data.spec.batch_size == 64
    relative = tmp_path / "rel.json"
    relative.write_text(json.dumps({"timm_name": NAME, "data": {"name": "imagefolder", "root": "images"}}))
    assert Path(sources.read_card(relative).saved_data().spec.root) == tmp_path / "images"


@pytest.mark.parametrize(("card", "message"), [
    ("{not json", "not readable JSON"),
    ('["timm_name"]', "needs a string field 'timm_name'"),
    ('{"timm_name": ""}', "needs a string field 'timm_name'"),
    ('{"timm_name": 3}', "needs a string field 'timm_name'"),
    ('{"timm_name": "vit_tiny_patch16_224", "kwargs": [1]}', "'kwargs' must be an object"),
    ('{"timm_name": "vit_tiny_patch16_224", "arch": 7}', "'arch' must be the name of an architecture plugin"),
], ids=["json", "list", "empty-name", "number-name", "kwargs", "arch"])
def test_a_bad_card_is_one_line(tmp_path: Path, card: str, message: str) -> None:
    path = tmp_path / "card.json"
    path.write_text(card)
    with pytest.raises(CheckpointError) as exc:
        sources.read_card(path)
    assert str(exc.value).startswith(f"model card {path}: ") and message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_a_bad_saved_data_section_is_worded_once(tmp_path: Path, saved: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for entry in saved.iterdir():
        (broken / entry.name).write_bytes(entry.read_bytes())
    recipe = yaml.safe_load((broken / "recipe.yaml").read_text())
    recipe["data"]["name"] = "no-such-data"
    (broken / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RmtpError, match=r"recipe\.yaml: data\.name: not a valid data section"):
        sources.saved_data(broken)
    from rmtp.export import ExportError, export_model

    with pytest.raises(ExportError, match=r"recipe\.yaml: data\.name: not a valid data section"):
        export_model(broken, tmp_path / "m.onnx", format="onnx", check=True)
    with pytest.raises(BenchError, match=r"recipe\.yaml: data\.name: not a valid data section"):
        load_candidates([str(broken)])


# --------------------------------------------------------------------------- every command asks it


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the resolver's entry points; the package face looks them up on every use."""
    counted = {"resolve_source": 0, "source_for_spec": 0, "saved_data": 0, "load": 0}

    def spy(name: str, real):
        def wrapper(*args, **kwargs):
            counted[name] += 1
            return real(*args, **kwargs)
        return wrapper

    for name in ("resolve_source", "source_for_spec", "saved_data"):
        monkeypatch.setattr(resolver, name, spy(name, getattr(resolver, name)))
    monkeypatch.setattr(resolver.SavedFolder, "load", spy("load", resolver.SavedFolder.load))
    return counted


def test_analyze_spectrum_and_bench_resolve_once_per_model(calls: dict[str, int], saved: Path, hub: Path) -> None:
    assert open_model(str(saved)).kind == "folder" and calls["resolve_source"] == 1 and calls["load"] == 1
    assert open_model(str(hub)).spec.name == NAME and calls["resolve_source"] == 2
    candidates = load_candidates([str(saved), str(hub), f"timm:{NAME}"], model_kwargs=None)
    assert calls["resolve_source"] == 5 and calls["saved_data"] == 1 and calls["load"] == 2
    folder = candidates[0]
    assert folder.kind == "folder" and folder.eval_data.spec == sources.saved_data(saved).spec


def test_recipe_pipeline_and_preflight_resolve_through_it(calls: dict[str, int], hub: Path, tmp_path: Path,
                                                          model: nn.Module) -> None:
    from rmtp.run.pipeline import build_model
    from rmtp.run.preflight import preflight

    recipe = tiny_recipe([{"evaluate": {}}])
    recipe["model"] = {"checkpoint": str(hub)}
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert calls["resolve_source"] == 1 and loaded.model.name == NAME
    built, spec, baseline, arch = build_model(loaded, loaded.plugins)
    assert calls["source_for_spec"] == 1 and same_logits(built, model) and arch.name == "vit"
    assert spec == baseline and spec.checkpoint == hub / "model.safetensors"
    preflight(loaded)
    assert calls["source_for_spec"] == 2


def test_a_recipe_takes_a_weights_file_from_its_card(tmp_path: Path, model: nn.Module) -> None:
    path = write_weights(tmp_path / "w.safetensors", model, {"timm_name": NAME, "kwargs": TINY_VIT})
    recipe = tiny_recipe([{"evaluate": {}}])
    recipe["model"] = {"checkpoint": "w.safetensors", "kwargs": {"drop_rate": 0.0}}
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe))
    assert loaded.model.name == NAME and loaded.model.kwargs == {**TINY_VIT, "drop_rate": 0.0}
    assert loaded.model.checkpoint == path
    # with model.name given, the recipe's kwargs are the record: the card is not read
    recipe["model"] = {"name": NAME, "kwargs": dict(TINY_VIT), "checkpoint": "w.safetensors"}
    path.with_suffix(".json").write_text("{not json")
    assert load_recipe(write_recipe(tmp_path / "r.yaml", recipe)).model.kwargs == TINY_VIT
    recipe["model"] = {"checkpoint": "w.safetensors"}
    with pytest.raises(RecipeError, match="model card .*w.json: not readable JSON"):
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))


def test_export_and_token_map_read_the_saved_data_through_it(calls: dict[str, int], saved: Path, model: nn.Module,
                                                             tmp_path: Path) -> None:
    from rmtp.export import export_model

    report = export_model(saved, tmp_path / "m.pt2", format="pt2")
    assert calls["load"] == 1 and calls["saved_data"] == 1
    assert report.input_shape == (1, 16, 16)  # the saved data's image size
    from rmtp_plugins.tokens.visualize import visualize_run

    with pytest.raises(RmtpError, match="not a token-reduced model"):  # refused before any data is read
        visualize_run(saved, tmp_path / "map.png", images=2)
    assert calls["saved_data"] == 1
    merged = copy.deepcopy(model)
    rmtp.prune(merged, "tome", r=2)
    spec = ModelSpec(name=NAME, kwargs=dict(TINY_VIT))
    folder = rmtp.save(merged, tmp_path / "merged", spec=spec, arch=get_plugins().architecture_for(NAME),
                       baseline=spec, recipe={"model": {"name": NAME, "kwargs": dict(TINY_VIT)}, "seed": 5,
                                              "data": dict(DATA)})
    visualize_run(folder, tmp_path / "map.png", images=2)
    assert calls["saved_data"] == 2 and (tmp_path / "map.png").is_file()
