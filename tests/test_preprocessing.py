"""imagefolder evaluation preprocessing (issue 14): exactly timm's for a pretrained config (and
timm's validate loop's top-1), the recipe's keys otherwise, ``resize: native`` for a model trained
on the images' own size.

The images are real: scikit-learn's digits written as 32×32 PNGs in class folders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image

import rmtp
from rmtp.data import DataSpec, ImageSizeError, build_data
from rmtp.errors import DataError, RecipeError

#: Models whose pretrained configs cover timm's cases: bicubic and bilinear, crop_pct 0.875 to 1.0,
#: center / squash / border crops, ImageNet, 0.5 and CLIP normalisation, a test_input_size.
PRETRAINED = ["test_vit", "test_resnet", "test_efficientnet", "deit_tiny_patch16_224.fb_in1k",
              "convnext_atto.d2_in1k", "resnet50.a1_in1k", "vit_base_patch16_clip_224.openai",
              "convnext_tiny.in12k_ft_in1k_384", "deepseek_vit_412m.deepseek_v4_1_flash"]


def write_digits(root: Path) -> Path:
    """train/ and val/ (every 5th digit) of 32×32 RGB PNGs, one folder per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / ("val" if index % 5 == 0 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
        pixels.convert("RGB").save(folder / f"{index:04d}.png")
    return root


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"))


def _meta_model(name: str, **kwargs):
    """The model's structure and pretrained config, no weights (transforms only read the config)."""
    with torch.device("meta"):
        return timm.create_model(name, num_classes=10, **kwargs)


def _folder(root: Path, **keys) -> DataSpec:
    return DataSpec(name="imagefolder", root=root, **keys)


def _images(root: Path, count: int = 6) -> list[Image.Image]:
    paths = sorted((root / "val").rglob("*.png"))[:: 360 // count][:count]
    images = [Image.open(path).convert("RGB") for path in paths]
    wide = Image.new("RGB", (48, 32))  # a non-square one too: two digits side by side
    wide.paste(images[0], (0, 0))
    wide.paste(images[1].crop((0, 0, 16, 32)), (32, 0))
    return [*images, wide]


def _same_outputs(ours, theirs, images: list[Image.Image]) -> None:
    for image in images:
        assert torch.equal(ours(image), theirs(image))


# --- eval: exactly timm's --------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRETRAINED)
def test_a_pretrained_config_gets_exactly_timms_eval_transform(digits_folder: Path, name: str) -> None:
    model = _meta_model(name)
    bundle = build_data(_folder(digits_folder), model)
    config = timm.data.resolve_data_config(model=model)
    theirs = timm.data.create_transform(**config)
    ours = bundle.val.transform
    assert repr(ours) == repr(theirs)
    _same_outputs(ours, theirs, _images(digits_folder))
    assert bundle.train.transform is ours and bundle.calibration.dataset.transform is ours
    resolved = {key: bundle.preprocessing[key] for key in config}
    assert resolved == {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
    assert bundle.preprocessing["from_recipe"] == []


def _probe(model: torch.nn.Module, root: Path) -> torch.nn.Module:
    """Fit the model's head in closed form (ridge regression on its random features of 400 train
    images): a model briefly trained on timm's preprocessing, well above chance."""
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    paths = sorted((root / "train").rglob("*.png"))
    chosen = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0))[:400].tolist()
    images = torch.stack([transform(Image.open(paths[i]).convert("RGB")) for i in chosen])
    labels = torch.tensor([int(paths[i].parent.name) for i in chosen])
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
        mean, std = features.mean(0), features.std(0) + 1e-6
        a = torch.cat([(features - mean) / std, torch.ones(len(features), 1)], 1)
        w = torch.linalg.solve(a.T @ a + torch.eye(a.shape[1]), a.T @ torch.nn.functional.one_hot(labels, 10).float())
        head = model.get_classifier()
        head.weight.copy_((w[:-1] / std[:, None]).T)
        head.bias.copy_(w[-1] - (mean / std) @ w[:-1])
    return model.eval()


def _timm_validate_top1(model: torch.nn.Module, root: Path, *, prefetcher: bool) -> tuple[float, torch.Tensor]:
    """The essential loop of timm's ``validate.py`` (huggingface/pytorch-image-models, ``validate()``):
    ``resolve_data_config(vars(args), model=model, use_test_size=not args.use_train_size)``,
    ``create_dataset(root=..., input_img_mode='RGB')``, ``create_loader(dataset, input_size,
    batch_size, use_prefetcher, interpolation, mean, std, crop_pct, crop_mode, device)``, then
    ``model.eval()``, ``torch.inference_mode()``, ``accuracy(output, target, topk=(1, 5))`` averaged
    over images. Returns (top-1 in percent, per-image predictions)."""
    from timm.utils import AverageMeter, accuracy

    data_config = timm.data.resolve_data_config({}, model=model, use_test_size=True)
    input_img_mode = "RGB" if data_config["input_size"][0] == 3 else "L"
    dataset = timm.data.create_dataset(root=str(root), name="", split="validation", input_img_mode=input_img_mode)
    loader = timm.data.create_loader(
        dataset, input_size=data_config["input_size"], batch_size=64, use_prefetcher=prefetcher,
        interpolation=data_config["interpolation"], mean=data_config["mean"], std=data_config["std"],
        num_workers=0, crop_pct=data_config["crop_pct"], crop_mode=data_config["crop_mode"],
        device=torch.device("cpu"))
    top1, predictions = AverageMeter(), []
    model.eval()
    with torch.inference_mode():
        for images, target in loader:
            output = model(images)
            acc1, _ = accuracy(output, target, topk=(1, 5))
            top1.update(acc1.item(), output.shape[0])
            predictions.append(output.argmax(1))
    return top1.avg, torch.cat(predictions)


def test_top1_on_an_image_folder_equals_timms_validate_loop(digits_folder: Path) -> None:
    torch.manual_seed(0)
    model = _probe(timm.create_model("test_vit", num_classes=10), digits_folder)
    bundle = build_data(_folder(digits_folder), model)
    ours = rmtp.evaluate(model, bundle).stats.top1
    with torch.inference_mode():
        predictions = torch.cat([model(images).argmax(1) for images, _ in bundle.loader("val")])
    theirs, their_predictions = _timm_validate_top1(model, digits_folder / "val", prefetcher=False)
    prefetched, prefetched_predictions = _timm_validate_top1(model, digits_folder / "val", prefetcher=True)
    print(f"\ntest_vit (probe head) on {len(bundle.val)} digits: rmtp {ours:.4f}%, timm validate loop "
          f"{theirs:.4f}% (prefetcher {prefetched:.4f}%)")
    assert ours > 50  # briefly trained, well above chance: a real comparison
    assert torch.equal(predictions, their_predictions) and torch.equal(predictions, prefetched_predictions)
    assert ours == pytest.approx(theirs, abs=1e-9) and ours == pytest.approx(prefetched, abs=1e-9)


# --- eval: the recipe's keys -----------------------------------------------------------------------


@pytest.mark.parametrize(("keys", "timm_args"), [
    ({"interpolation": "bilinear"}, {"interpolation": "bilinear"}),
    ({"crop_pct": 1.0}, {"crop_pct": 1.0}),
    ({"crop_mode": "squash", "crop_pct": 0.8}, {"crop_mode": "squash", "crop_pct": 0.8}),
    ({"crop_mode": "border"}, {"crop_mode": "border"}),
    ({"mean": [0.1, 0.2, 0.3], "std": 0.25}, {"mean": (0.1, 0.2, 0.3), "std": (0.25,)}),
    ({"resize": 96}, {"input_size": (3, 96, 96)}),
    ({"resize": [96, 128], "interpolation": "nearest"}, {"input_size": (3, 96, 128), "interpolation": "nearest"}),
])
def test_each_data_key_overrides_the_pretrained_config(digits_folder: Path, keys: dict, timm_args: dict) -> None:
    model = _meta_model("test_vit")
    bundle = build_data(_folder(digits_folder, **keys), model)
    theirs = timm.data.create_transform(**timm.data.resolve_data_config(timm_args, model=model))
    assert repr(bundle.val.transform) == repr(theirs)
    _same_outputs(bundle.val.transform, theirs, _images(digits_folder))
    assert sorted(bundle.preprocessing["from_recipe"]) == sorted(keys)
    assert set(bundle.preprocessing["from_model"]).isdisjoint(k if k != "resize" else "input_size" for k in keys)


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference ViT's own images (digits upsampled to 32×32 as it was trained on them) as
    greyscale PNGs: val/ its held-out split (split seed 0), train/ the rest."""
    from rmtp.data import digits_tensors
    from rmtp.data.splits import split_indices

    root = tmp_path_factory.mktemp("reference")
    images, labels = digits_tensors(32, 1)
    pixels = ((images[:, 0] * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    train, val = split_indices(len(labels), 0.2, 0)
    for split, indices in (("train", train), ("val", val)):
        for index in indices:
            folder = root / split / str(int(labels[index]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[index], mode="L").save(folder / f"{index:04d}.png")
    return root


def _reference_vit() -> torch.nn.Module:
    """models/digits_vit: a ViT trained with its own loop on 32×32 digits, no resize or crop."""
    import json

    from conftest import REPO

    from rmtp.contract.architecture import ModelSpec
    from rmtp.plugins import get_plugins

    card = json.loads((REPO / "models" / "digits_vit.json").read_text())
    spec = ModelSpec(name=card["timm_name"], kwargs=card["kwargs"],
                     checkpoint=REPO / "models" / "digits_vit.safetensors")
    return get_plugins().architecture_for(spec.name).create(spec).eval()


def test_a_model_trained_on_native_images_is_evaluated_on_them(reference_folder: Path) -> None:
    """The issue's case: a model trained on the images' own size. resize: native (with its training
    mean/std) gives it exactly the tensors a plain torch loop does, and the same top-1; the model's
    pretrained config (vit_tiny_patch16_224: resize 35 bicubic, centre crop 32) costs points."""
    model = _reference_vit()
    paths = sorted((reference_folder / "val").rglob("*.png"))
    with torch.no_grad():
        plain = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("L")))[None] for p in paths])
        plain = (plain.float() / 255 - 0.5) / 0.5
        labels = torch.tensor([int(p.parent.name) for p in paths])
        torch_top1 = 100.0 * int((model(plain).argmax(1) == labels).sum()) / len(paths)

    native = build_data(_folder(reference_folder, resize="native", mean=0.5, std=0.5), model)
    assert torch.equal(torch.stack([native.val[i][0] for i in range(len(paths))]), plain)
    native_top1 = rmtp.evaluate(model, native).stats.top1
    whole = build_data(_folder(reference_folder, crop_pct=1.0, mean=0.5, std=0.5), model)  # 32 → 32: no resize
    assert torch.equal(whole.val[0][0], native.val[0][0])
    default_top1 = rmtp.evaluate(model, build_data(_folder(reference_folder), model)).stats.top1
    print(f"\nreference ViT on its {len(paths)} val digits as 32x32 PNGs: plain torch {torch_top1:.2f}%, rmtp "
          f"resize: native {native_top1:.2f}%, rmtp pretrained config (resize 35 bicubic, crop 32) {default_top1:.2f}%")
    assert native_top1 == pytest.approx(torch_top1, abs=1e-9) and native_top1 > 95
    assert default_top1 < native_top1
    assert native.preprocessing["resize"] == "native" and native.preprocessing["input_size"] == [1, 32, 32]
    assert native.describe() == ("preprocessing (data: resize, mean, std; the rest the model's pretrained config): "
                                 "native 32x32 (no resize, no crop), mean (0.5), std (0.5)")


def test_native_images_of_another_size_are_named(tmp_path: Path) -> None:
    for label, size in (("a", (24, 24)), ("b", (24, 24)), ("b", (20, 24))):
        (tmp_path / label).mkdir(exist_ok=True)
        Image.new("RGB", size).save(tmp_path / label / f"{size[0]}.png")
    bundle = build_data(_folder(tmp_path, resize="native", val_fraction=0.3),
                        timm.create_model("test_resnet", num_classes=2))
    files = bundle.train.dataset
    bad = next(i for i, (path, _) in enumerate(files.samples) if path.endswith("20.png"))
    with pytest.raises(ImageSizeError, match=r"data.resize: native: image .*20.png is 20x24 .* first one is 24x24"):
        files[bad]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(files, [bad]), num_workers=1)
    with pytest.raises(ImageSizeError) as caught:
        next(iter(loader))
    assert str(caught.value).startswith("data.resize: native: image ") and "\n" not in str(caught.value)


def test_greyscale_models_get_one_value_and_digits_state_their_fixed_preprocessing(digits_folder: Path) -> None:
    from conftest import TINY_VIT

    grey = timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, "img_size": 32})
    bundle = build_data(_folder(digits_folder), grey)
    assert bundle.preprocessing["mean"] == [0.5] and bundle.val[0][0].shape == (1, 32, 32)
    assert build_data(_folder(digits_folder, mean=0.1, std=[0.2]), grey).preprocessing["std"] == [0.2]
    digits = build_data(DataSpec(), grey)
    assert digits.transforms is None
    assert {k: digits.preprocessing[k] for k in ("name", "input_size", "interpolation", "mean", "std")} == {
        "name": "digits", "input_size": [1, 32, 32], "interpolation": "bilinear", "mean": [0.5], "std": [0.5]}
    assert digits.describe() == "preprocessing (digits, fixed): 8x8 → 32x32 bilinear, no crop, mean (0.5), std (0.5)"


# --- refused clearly -------------------------------------------------------------------------------


@pytest.mark.parametrize(("keys", "message"), [
    ({"interpolation": "cubic"}, ("data.interpolation: Input should be 'nearest', 'bilinear', 'bicubic', 'box', "
                                  "'hamming' or 'lanczos' (got 'cubic')")),
    ({"crop_pct": 1.5}, "data.crop_pct: Input should be less than or equal to 1 (got 1.5)"),
    ({"crop_pct": 0}, "data.crop_pct: Input should be greater than 0 (got 0)"),
    ({"crop_mode": "centre"}, "data.crop_mode: Input should be 'center', 'squash' or 'border' (got 'centre')"),
    ({"std": [0.2, 0, 0.2]}, "data.std: std values must be greater than 0"),
    ({"mean": "half"}, "data.mean: mean takes one number per input channel"),
    ({"resize": "big"}, "data.resize: resize takes a side (an int), [height, width] (1 to 4096 px), or 'native'"),
    ({"resize": [1, 2, 3]}, "data.resize: resize takes a side"),
    ({"resize": "native", "crop_pct": 1.0}, "data.crop_pct: crop_pct has no effect with data.resize: native"),
    ({"img_size": 28}, "data.img_size: img_size is the digits' upsampling side; for imagefolder set data.resize"),
])
def test_bad_preprocessing_keys_are_one_line_each(tmp_path: Path, keys: dict, message: str) -> None:
    from rmtp.run.recipe import parse_recipe

    raw = {"model": {"name": "test_vit"}, "data": {"name": "imagefolder", "root": str(tmp_path), **keys},
           "steps": [{"evaluate": {}}]}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(raw)
    assert any(line.startswith(f"<recipe>: {message}") for line in caught.value.problems), caught.value.problems


def test_digits_refuse_imagefolder_preprocessing() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"crop_pct sets imagefolder preprocessing; digits use a fixed one "
                                              r"\(the 8x8 digits are upsampled"):
        DataSpec(crop_pct=1.0)


def test_build_time_checks(digits_folder: Path) -> None:
    with pytest.raises(DataError, match=r"^data.mean: 2 values for a model with 3 input channel\(s\); give 3 "):
        build_data(_folder(digits_folder, mean=[0.5, 0.5]), _meta_model("test_vit"))
    strict = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32,
                               num_heads=2, num_classes=10)
    with pytest.raises(DataError, match=r"^data.resize: the model cannot take 64x64 images \(.*\); remove "
                                        r"data.resize to use the model's input size \(32x32\)"):
        build_data(_folder(digits_folder, resize=64), strict)
    small = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, embed_dim=32,
                              num_heads=2, num_classes=10)
    with pytest.raises(DataError, match=r"^data.resize: native: the model cannot take the images' own 32x32 "):
        build_data(_folder(digits_folder, resize="native"), small)
