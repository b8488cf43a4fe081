"""Unlabeled images (issue 21, item 6): a folder of images with no class folders loads, a fine-tune
distils on it alone, budgets in minutes stop it, and whatever needs labels is refused in one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_VIT, tiny_recipe
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import rmtp
from rmtp.data import UNLABELED, DataError, DataSpec, build_data
from rmtp.errors import RecipeError, RmtpError
from rmtp.measure import agreement, top1
from rmtp.run.recipe import parse_recipe
from rmtp.training import TrainConfig, kd_loss, lr_at, train


def _images(folder: Path, count: int, *, start: int = 0, size: tuple[int, int] = (20, 24)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def _folder_vit(num_classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32,
                             num_heads=2, num_classes=num_classes)


def _digits_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, "depth": 1})


@pytest.fixture(scope="module")
def digits_unlabeled():
    return build_data(DataSpec(unlabeled=True, batch_size=64, eval_limit=128), _digits_vit())


# --- data ----------------------------------------------------------------------------------------


def test_an_image_folder_without_class_folders_loads_unlabeled(tmp_path: Path) -> None:
    """Images in the root and in sub-folders at any depth are all images (sub-folders are not classes);
    hidden files and folders are skipped; every label is UNLABELED; the split is seeded."""
    _images(tmp_path, 4)
    _images(tmp_path / "2024" / "june", 4, start=4)
    _images(tmp_path / ".thumbnails", 3, start=8)  # hidden: not images of the data
    (tmp_path / "notes.txt").write_text("not an image")
    spec = DataSpec(name="imagefolder", root=tmp_path, unlabeled=True, val_fraction=0.25, calibration_size=3)
    bundle = build_data(spec, _folder_vit())
    assert not bundle.labeled
    assert (len(bundle.train), len(bundle.val), len(bundle.calibration)) == (6, 2, 3)
    image, label = bundle.train[0]
    assert image.shape == (3, 32, 32) and label == UNLABELED
    assert bundle.num_classes == 5  # the model's head: KD distils over its outputs
    again = build_data(spec, _folder_vit())
    assert list(again.val.indices) == list(bundle.val.indices)
    files = {Path(path).name for path, _ in bundle.train.dataset.samples}
    assert files == {f"{i}.png" for i in range(8)}


def test_an_unlabeled_root_with_train_and_val_uses_them_as_the_splits(tmp_path: Path) -> None:
    _images(tmp_path / "train" / "any", 5)
    _images(tmp_path / "val", 2, start=5)
    bundle = build_data(DataSpec(name="imagefolder", root=tmp_path, unlabeled=True), _folder_vit())
    assert (len(bundle.train), len(bundle.val)) == (5, 2)


def test_unlabeled_folder_problems_are_named(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=r"has no images, in it or in any folder below it"):
        build_data(DataSpec(name="imagefolder", root=tmp_path / "empty", unlabeled=True), _folder_vit())
    _images(tmp_path / "half" / "train", 3)
    with pytest.raises(DataError, match=r"has train/ but no val/"):
        build_data(DataSpec(name="imagefolder", root=tmp_path / "half", unlabeled=True), _folder_vit())
    _images(tmp_path / "loose", 3)  # labelled (the default): the refusal points at data.unlabeled
    with pytest.raises(DataError, match=r"no class subfolders; .*or set data.unlabeled: true"):
        build_data(DataSpec(name="imagefolder", root=tmp_path / "loose"), _folder_vit())


def test_unlabeled_digits_drop_their_labels(digits_unlabeled) -> None:
    assert not digits_unlabeled.labeled
    labels = torch.stack([torch.as_tensor(digits_unlabeled.train[i][1]) for i in range(20)])
    assert (labels == UNLABELED).all()


def test_top1_refuses_unlabeled_images_and_agreement_replaces_it(digits_unlabeled) -> None:
    model = _digits_vit()
    loader = digits_unlabeled.loader("val")
    with pytest.raises(DataError, match=r"^top-1 needs labels, and the data is unlabeled"):
        top1(model, loader, device="cpu")
    assert agreement(model, rmtp.frozen_copy(model), loader, device="cpu") == 100.0


# --- fine-tune: distillation alone --------------------------------------------------------------


def _kd_on(model: torch.nn.Module, teacher: torch.nn.Module, images: torch.Tensor) -> float:
    with torch.no_grad():
        return float(kd_loss(model.eval()(images), teacher.eval()(images), 2.0))


def test_distillation_on_an_unlabeled_folder_lowers_the_kd_loss(tmp_path: Path) -> None:
    _images(tmp_path, 24)
    model = _folder_vit()
    with torch.no_grad():  # a random head's logits barely differ: give the teacher something to teach
        model.head.weight.mul_(10)
    bundle = build_data(DataSpec(name="imagefolder", root=tmp_path, unlabeled=True, batch_size=8), model)
    dense = rmtp.frozen_copy(model)
    rmtp.prune(model, "magnitude", sparsity=0.7, scope="global")
    images = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])
    before = _kd_on(model, dense, images)
    report = rmtp.finetune(model, bundle, teacher=dense, distill={"weight": 1.0}, epochs=6, lr=3e-3, seed=0)
    assert _kd_on(model, dense, images) < 0.5 * before
    assert report.stats.top1 is None  # no fake accuracy
    assert all(epoch["val_top1"] is None and 0 <= epoch["val_agreement"] <= 100 for epoch in report.history)


def test_distillation_on_unlabeled_digits_runs_and_lowers_the_kd_loss(digits_unlabeled) -> None:
    model = _digits_vit()
    dense = rmtp.frozen_copy(model)
    rmtp.prune(model, "magnitude", sparsity=0.7, scope="global")
    images = torch.stack([digits_unlabeled.train[i][0] for i in range(256)])
    before = _kd_on(model, dense, images)
    result = train(model, digits_unlabeled, TrainConfig(epochs=1, lr=2e-3, seed=0, max_steps=15,
                                                        distill={"weight": 1.0}), device="cpu", teacher=dense)
    assert _kd_on(model, dense, images) < before
    assert result.final_val_top1 is None and result.history[-1].val_agreement is not None
    assert (result.steps, result.stopped) == (15, "max_steps")


def test_rmtp_finetune_takes_a_dataloader_of_images_as_unlabeled() -> None:
    torch.manual_seed(0)
    images = torch.randn(24, 1, 16, 16)
    model = _digits_vit()
    dense = rmtp.frozen_copy(model)
    rmtp.prune(model, "magnitude", sparsity=0.5)
    for data in (TensorDataset(images), TensorDataset(images, torch.zeros(24, dtype=torch.long))):
        report = rmtp.finetune(model, DataLoader(data, batch_size=8), teacher=dense, distill={"weight": 1.0},
                               epochs=1, lr=1e-3, seed=0)
        assert report.stats.top1 is None and report.history[-1]["steps"] == 3
    with pytest.raises(RmtpError, match=r"a DataLoader is read as unlabeled images, trained by distillation alone"):
        rmtp.finetune(model, DataLoader(TensorDataset(images), batch_size=8), teacher=dense)
    with pytest.raises(RmtpError, match=r"a DataLoader is read as unlabeled images.*distill=\{'weight': 1.0\}"):
        rmtp.finetune(model, DataLoader(TensorDataset(images), batch_size=8), distill={"weight": 1.0})


def test_rmtp_finetune_refuses_a_loader_without_length_in_one_line() -> None:
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield from torch.randn(8, 1, 16, 16)

    model = _digits_vit()
    with pytest.raises(RmtpError, match="has no length"):
        rmtp.finetune(model, DataLoader(Stream(), batch_size=4), teacher=rmtp.frozen_copy(model),
                      distill={"weight": 1.0})


@pytest.mark.parametrize(("config", "key"), [
    ({}, "finetune.distill: not set"),
    ({"distill": {"weight": 0.5}}, "finetune.distill.weight: 0.5 keeps 0.5 of cross-entropy"),
    ({"distill": {"weight": 1.0}, "mixup": {"mixup_alpha": 0.8}}, "finetune.mixup: mixes labels"),
])
def test_a_fine_tune_that_needs_labels_is_refused_in_one_line(digits_unlabeled, config, key) -> None:
    model = _digits_vit()
    with pytest.raises(RmtpError) as info:
        rmtp.finetune(model, digits_unlabeled, teacher=rmtp.frozen_copy(model), **config)
    message = str(info.value)
    assert message.startswith(key) and "data.unlabeled: true" in message and "\n" not in message


def test_evaluate_on_unlabeled_data_reports_agreement_not_top1(digits_unlabeled) -> None:
    model = _digits_vit()
    dense = rmtp.frozen_copy(model)
    report = rmtp.evaluate(model, digits_unlabeled, dense=dense)
    assert report.stats.top1 is None
    assert report.notes[0].endswith("top-1 agreement with the dense model 100.00% on 128 val images")
    with pytest.raises(RecipeError, match="pass dense="):
        rmtp.evaluate(model, digits_unlabeled)


@pytest.fixture(scope="module")
def digits_labeled():
    return build_data(DataSpec(batch_size=64, eval_limit=128), _digits_vit())


@pytest.mark.parametrize("labels", ["unlabeled", "labeled"])
def test_evaluate_leaves_the_callers_dense_model_alone(labels, request, monkeypatch) -> None:
    """The dense model is the caller's reference: evaluating another model against it must not
    move it (``.to`` on it), swap its tensors or change its train/eval flags, with labels or without."""
    data = request.getfixturevalue(f"digits_{labels}")
    model = _digits_vit()
    dense = _digits_vit().train()
    moved: list[tuple] = []
    monkeypatch.setattr(dense, "to", lambda *args, **kwargs: moved.append(args) or dense)
    tensors = [*dense.parameters(), *dense.buffers()]
    flags = [m.training for m in dense.modules()]
    rmtp.evaluate(model, data, dense=dense, device="cpu")
    assert moved == []
    assert all(a is b for a, b in zip([*dense.parameters(), *dense.buffers()], tensors, strict=True))
    assert [m.training for m in dense.modules()] == flags


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a dense model on another device needs CUDA")
@pytest.mark.parametrize("labels", ["unlabeled", "labeled"])
def test_evaluate_uses_a_copy_of_a_dense_model_on_another_device(labels, request) -> None:
    data = request.getfixturevalue(f"digits_{labels}")
    model = _digits_vit().cuda()
    dense = _digits_vit()
    report = rmtp.evaluate(model, data, dense=dense, device="cuda")
    assert {p.device.type for p in dense.parameters()} == {"cpu"}
    same = {"unlabeled": "agreement with the dense model 100.00%", "labeled": "(+0.00 points)"}[labels]
    assert same in report.notes[0]


# --- budgets in minutes -------------------------------------------------------------------------


def test_a_minutes_budget_stops_the_fine_tune_early(digits_unlabeled) -> None:
    model = _digits_vit()
    dense = rmtp.frozen_copy(model)
    config = TrainConfig(epochs=3, lr=1e-3, seed=0, batch_size=32, distill={"weight": 1.0}, max_minutes=1e-4)
    result = train(model, digits_unlabeled, config, device="cpu", teacher=dense)
    full = 3 * len(digits_unlabeled.loader("train", batch_size=32))
    assert 1 <= result.steps < full and result.stopped == "max_minutes"
    assert len(result.history) == 1 and result.history[-1].stopped == "max_minutes"


def test_a_resumed_minutes_budget_gets_only_the_minutes_left(digits_unlabeled) -> None:
    """The checkpoint records the seconds spent; a resume whose budget is already spent takes one
    step and stops, instead of starting the budget over."""
    model = _digits_vit()
    dense = rmtp.frozen_copy(model)
    config = TrainConfig(epochs=1, lr=1e-3, seed=0, batch_size=64, distill={"weight": 1.0}, max_minutes=60.0,
                         checkpoint_every=2, max_steps=4)
    states = []
    train(model, digits_unlabeled, config, device="cpu", teacher=dense, on_checkpoint=states.append)
    assert states and states[0].seconds > 0 and states[0].step == 2
    spent = dataclasses.replace(states[0], seconds=3600.0)
    result = train(model, digits_unlabeled, config, device="cpu", teacher=dense, resume=spent)
    assert (result.steps, result.stopped) == (3, "max_minutes")


def test_the_cosine_follows_whichever_budget_is_nearer_its_end() -> None:
    common = {"total_steps": 100, "warmup_steps": 0, "lr": 1.0}
    assert lr_at(10, **common, time_fraction=0.0) == lr_at(10, **common)
    assert lr_at(10, **common, time_fraction=0.5) == pytest.approx(0.5)
    assert lr_at(10, **common, time_fraction=1.0) == pytest.approx(0.0)
    assert lr_at(90, **common, time_fraction=0.2) == lr_at(90, **common)  # steps ahead: steps decide
    assert lr_at(2, total_steps=100, warmup_steps=5, lr=1.0, time_fraction=0.9) == pytest.approx(0.6)  # warm-up


# --- recipes ------------------------------------------------------------------------------------


def _problems(steps: list[dict], data: dict | None = None) -> str:
    recipe = tiny_recipe(steps)
    recipe["data"].update(data if data is not None else {"unlabeled": True})
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe)
    assert all("\n" not in problem for problem in info.value.problems)
    return "\n".join(info.value.problems)


def test_a_recipe_needing_labels_on_unlabeled_data_is_refused_by_key() -> None:
    text = _problems([{"prune": "magnitude", "params": {"sparsity": 0.5}},
                      {"finetune": {"epochs": 1}},
                      {"finetune": {"distill": {"weight": 0.9}}},
                      {"finetune": {"distill": {"weight": 1.0}, "mixup": {"mixup_alpha": 0.5}}},
                      {"prune": "spp", "params": {"ratio": 0.3, "loss": "ce"}}])
    assert "steps[1].finetune.distill: not set, and the data is unlabeled" in text
    assert "steps[2].finetune.distill.weight: 0.9 keeps 0.1 of cross-entropy" in text
    assert "steps[3].finetune.mixup: mixes labels" in text
    assert "steps[4].params.loss: ce is cross-entropy on labels" in text and "use loss: kd" in text
    assert "steps[0]" not in text


def test_a_kd_only_recipe_on_unlabeled_data_validates() -> None:
    recipe = tiny_recipe([{"prune": "magnitude", "params": {"sparsity": 0.5}},
                          {"finetune": {"distill": {"weight": 1.0}, "max_minutes": 0.5}},
                          {"reconstruct": {"steps": 2}}, {"evaluate": {}}])
    recipe["data"]["unlabeled"] = True
    parsed = parse_recipe(recipe)
    assert parsed.data.unlabeled and parsed.steps[1].finetune.max_minutes == 0.5


@pytest.mark.parametrize(("step", "data", "expected"), [
    ({"finetune": {"distill": {"weight": 1.0}, "max_minutes": 0}}, {},
     "steps[0].finetune.max_minutes: Input should be greater than 0"),
    ({"finetune": {"max_minute": 3}}, {}, "steps[0].finetune.max_minute: unknown key 'max_minute'"),
    ({"evaluate": {}}, {"unlabeled": "sometimes"}, "data.unlabeled: Input should be a valid boolean"),
    ({"evaluate": {}}, {"unlabelled": True}, "data.unlabelled: unknown key 'unlabelled'"),
])
def test_bad_keys_are_named(step: dict, data: dict, expected: str) -> None:
    assert expected in _problems([step], data)


def test_a_recipe_on_an_unlabeled_folder_validates_the_folder(tmp_path: Path) -> None:
    model = {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32,
                                                        "num_heads": 2, "num_classes": 5}}
    steps = [{"finetune": {"distill": {"weight": 1.0}}}]
    _images(tmp_path / "photos" / "a", 3)
    recipe = {"model": model, "data": {"name": "imagefolder", "root": str(tmp_path / "photos"), "unlabeled": True},
              "steps": steps}
    assert parse_recipe(recipe).data.unlabeled  # num_classes 5, no class folders: nothing to compare
    (tmp_path / "none").mkdir()
    recipe["data"]["root"] = str(tmp_path / "none")
    with pytest.raises(RecipeError, match=r"data.root: .*none has no images, in it or in any folder below it"):
        parse_recipe(recipe)


def test_a_recipe_distils_on_unlabeled_data_and_reports_agreement(tmp_path: Path) -> None:
    from rmtp.run.pipeline import run_recipe

    recipe = tiny_recipe([{"prune": "magnitude", "params": {"sparsity": 0.6}},
                          {"finetune": {"distill": {"weight": 1.0}, "max_steps": 5, "lr": 1e-3}},
                          {"evaluate": {}}])
    recipe["data"].update(unlabeled=True, eval_limit=64)
    result = run_recipe(parse_recipe(recipe))
    assert result.report.dense.top1 is None
    assert all(step.stats.top1 is None for step in result.report.steps)
    assert "top-1 agreement with the dense model" in result.report.steps[-1].notes[0]


def test_a_labelled_recipe_saves_as_before_the_key_existed() -> None:
    """data.unlabeled is written only when true: a --resume of a checkpoint written before it existed
    compares equal, and a labelled recipe.yaml still loads in a release without the key."""
    labelled = parse_recipe(tiny_recipe([{"evaluate": {}}])).to_dict()["data"]
    assert "unlabeled" not in labelled
    recipe = tiny_recipe([{"evaluate": {}}])
    recipe["data"]["unlabeled"] = True
    assert parse_recipe(recipe).to_dict()["data"]["unlabeled"] is True
