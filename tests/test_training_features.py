"""Production fine-tuning options: precision, accumulation, mixup, channels-last, compile, loaders."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY_VIT, tiny_recipe
from pydantic import ValidationError

from rmtp.data import DataSpec, build_data
from rmtp.errors import RecipeError, RmtpError
from rmtp.run.recipe import parse_recipe
from rmtp.training import BatchProgress, TrainConfig, train, training_loss


def _vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **TINY_VIT)


@pytest.fixture(scope="module")
def bundle():
    return build_data(DataSpec(name="digits", batch_size=64, calibration_size=32, eval_limit=64), _vit())


def _trained(bundle, **config) -> tuple[torch.nn.Module, object]:
    model = _vit()
    result = train(model, bundle, TrainConfig(epochs=1, lr=1e-3, seed=0, **config), device="cpu")
    return model, result


def test_accumulating_two_half_batches_is_one_full_batch(bundle) -> None:
    """Same shuffle, same samples per optimizer step, mean of two half-batch means = the full mean:
    equal weights up to float summation order."""
    full, full_result = _trained(bundle, batch_size=64)
    halves, halves_result = _trained(bundle, batch_size=32, accumulate=2)
    for (name, a), b in zip(full.state_dict().items(), halves.state_dict().values()):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=name)
    assert abs(full_result.history[0].train_loss - halves_result.history[0].train_loss) < 1e-4


def test_accumulation_counts_optimizer_steps(bundle) -> None:
    seen: list[BatchProgress] = []
    model = _vit()
    train(model, bundle, TrainConfig(epochs=1, lr=1e-3, seed=0, batch_size=32, accumulate=4), device="cpu",
          on_batch=seen.append)
    batches = -(-len(bundle.train) // 32)
    assert [p.step for p in seen] == list(range(1, -(-batches // 4) + 1))
    assert seen[-1].images == len(bundle.train) and seen[-1].images_per_second > 0 and seen[-1].eta_seconds == 0


def test_bf16_autocast_trains_on_the_cpu(bundle) -> None:
    fp32, fp32_result = _trained(bundle)
    bf16, bf16_result = _trained(bundle, precision="bf16")
    assert all(p.dtype == torch.float32 for p in bf16.parameters())  # autocast: master weights stay fp32
    differs = any(not torch.equal(a, b) for a, b in zip(fp32.state_dict().values(), bf16.state_dict().values()))
    assert differs and abs(bf16_result.history[0].train_loss - fp32_result.history[0].train_loss) < 0.1


def test_fp16_is_refused_on_the_cpu(bundle) -> None:
    with pytest.raises(RmtpError, match="finetune.precision: fp16 needs a CUDA device"):
        _trained(bundle, precision="fp16")
    raw = tiny_recipe([{"finetune": {"precision": "fp16"}}])
    with pytest.raises(RecipeError, match=r"steps\[0\]\.finetune\.precision: fp16 needs a CUDA device"):
        parse_recipe(raw)
    with pytest.raises(RecipeError, match=r"precision: Input should be 'fp32', 'bf16' or 'fp16'"):
        parse_recipe(tiny_recipe([{"finetune": {"precision": "fp8"}}]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a GradScaler needs CUDA")
def test_fp16_with_a_grad_scaler_on_cuda(bundle) -> None:
    model = _vit().cuda()
    result = train(model, bundle, TrainConfig(epochs=1, lr=1e-3, seed=0, precision="fp16"), device="cuda")
    assert torch.isfinite(torch.tensor(result.history[0].train_loss))


def test_mixup_trains_with_soft_targets(bundle) -> None:
    _, result = _trained(bundle, mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0})
    assert torch.isfinite(torch.tensor(result.history[0].train_loss))
    with pytest.raises(ValidationError, match="set mixup_alpha or cutmix_alpha above 0"):
        TrainConfig(mixup={"mixup_alpha": 0.0})


def test_soft_target_loss_is_timms_soft_target_cross_entropy() -> None:
    from timm.loss import SoftTargetCrossEntropy

    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    targets = torch.softmax(torch.randn(6, 10, generator=torch.Generator().manual_seed(1)), dim=-1)
    ours = training_loss(logits, targets, None, TrainConfig())
    torch.testing.assert_close(ours, SoftTargetCrossEntropy()(logits, targets), atol=1e-7, rtol=1e-6)


def test_channels_last_gives_the_same_training_up_to_kernels() -> None:
    torch.manual_seed(0)
    kwargs = {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8], "num_classes": 10, "in_chans": 1}
    plain = timm.create_model("resnet18", **kwargs)
    last = timm.create_model("resnet18", **kwargs)
    last.load_state_dict(plain.state_dict())
    data = build_data(DataSpec(name="digits", batch_size=64, img_size=16, eval_limit=64), plain)
    a = train(plain, data, TrainConfig(epochs=1, lr=1e-3, seed=0), device="cpu")
    b = train(last, data, TrainConfig(epochs=1, lr=1e-3, seed=0, channels_last=True), device="cpu")
    assert last.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert abs(a.history[0].train_loss - b.history[0].train_loss) < 1e-3


def test_loader_settings_are_validated() -> None:
    with pytest.raises(ValidationError, match="persistent_workers needs num_workers > 0"):
        TrainConfig(num_workers=0, persistent_workers=True)
    with pytest.raises(ValidationError, match="accumulate"):
        TrainConfig(accumulate=0)


def test_workers_and_pinned_memory_train(bundle) -> None:
    _, result = _trained(bundle, num_workers=1, persistent_workers=True)
    assert result.history[0].val_top1 >= 0


@pytest.mark.slow
def test_compiled_student_matches_eager() -> None:
    """torch.compile of the student: the same training within compiled-kernel tolerance."""
    torch.manual_seed(0)
    kwargs = {**TINY_VIT, "depth": 1}
    eager = timm.create_model("vit_tiny_patch16_224", **kwargs)
    compiled = timm.create_model("vit_tiny_patch16_224", **kwargs)
    compiled.load_state_dict(eager.state_dict())
    data = build_data(DataSpec(name="digits", batch_size=128, eval_limit=64), eager)
    a = train(eager, data, TrainConfig(epochs=1, lr=1e-3, seed=0), device="cpu")
    b = train(compiled, data, TrainConfig(epochs=1, lr=1e-3, seed=0, compile=True), device="cpu")
    assert abs(a.history[0].train_loss - b.history[0].train_loss) < 1e-3


def test_max_steps_stops_the_run_and_fits_the_schedule(bundle) -> None:
    seen: list[BatchProgress] = []
    model = _vit()
    result = train(model, bundle, TrainConfig(epochs=3, lr=1e-3, seed=0, max_steps=5, warmup_epochs=0.0),
                   device="cpu", on_batch=seen.append)
    assert [p.step for p in seen] == [1, 2, 3, 4, 5] and len(result.history) == 1
    assert seen[-1].lr < seen[0].lr  # the cosine ran over the 5 steps, not over 3 epochs


def test_evaluate_in_bf16_and_fp16_refused_on_cpu(bundle) -> None:
    import rmtp

    model = _vit()
    fp32 = rmtp.evaluate(model, bundle).stats.top1
    bf16 = rmtp.evaluate(model, bundle, precision="bf16").stats.top1
    assert abs(fp32 - bf16) <= 5.0  # a random-init model: argmax ties may flip, the pass must run
    with pytest.raises(RmtpError, match="precision: fp16 needs a CUDA device"):
        rmtp.evaluate(model, bundle, precision="fp16")
    with pytest.raises(RecipeError, match=r"steps\[0\]\.evaluate\.precision: fp16 needs a CUDA device"):
        parse_recipe(tiny_recipe([{"evaluate": {"precision": "fp16"}}]))


def _png_folder(root, model, per_class: int = 6):
    """A real image folder: digits written as PNG files in class subfolders (train/ and val/)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split, offset in (("train", 0), ("val", 500)):
        for label in range(3):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            images = digits.images[digits.target == label][offset // 100: offset // 100 + per_class]
            for i, image in enumerate(images):
                rgb = Image.fromarray((image * 255 / 16).astype("uint8")).convert("RGB")
                rgb.resize((32, 32)).save(folder / f"{i}.png")
    return root


def test_timm_augmentation_trains_an_imagefolder_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", layers=[1, 1, 1, 1], channels=[8, 8, 8, 8], num_classes=3)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0}
    data = build_data(DataSpec(name="imagefolder", root=_png_folder(tmp_path / "images", model), batch_size=6), model)
    config = TrainConfig(epochs=1, lr=1e-3, seed=0, augment={"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25})
    result = train(model, data, config, device="cpu")
    assert torch.isfinite(torch.tensor(result.history[0].train_loss))
    assert TrainConfig(augment="timm").augment.hflip == 0.5  # timm's create_transform defaults


def test_timm_augmentation_is_refused_for_digits_before_any_work() -> None:
    with pytest.raises(RecipeError, match=r"steps\[0\]\.finetune\.augment: timm's training augmentation needs "
                                          r"data: imagefolder"):
        parse_recipe(tiny_recipe([{"finetune": {"augment": "timm"}}]))
    with pytest.raises(ValidationError, match="augment takes true/false"):
        TrainConfig(augment="yes")


def test_calibration_passes_run_in_the_steps_precision(bundle) -> None:
    """spp's search and n:m's Wanda statistics under bf16 autocast: the forward passes see bf16
    activations (a hook on a Linear records its input dtype), the results stay close to fp32."""
    import rmtp

    seen: dict[str, set[torch.dtype]] = {}
    for pruner, params in (("n:m", {"n": 2, "m": 4, "score": "wanda"}), ("spp", {"ratio": 0.3, "steps": 3})):
        for precision in ("fp32", "bf16"):
            model = _vit()
            dtypes = seen.setdefault(f"{pruner} {precision}", set())
            model.blocks[0].mlp.fc1.register_forward_hook(lambda m, args, out, d=dtypes: d.add(out.dtype))
            report = rmtp.prune(model, pruner, calibration=bundle.loader("calibration"), precision=precision,
                                **params)
            assert report.stats.params <= report.baseline.params
    # the MAC count after pruning runs in fp32 either way; only the calibration passes are bf16
    assert seen == {"n:m fp32": {torch.float32}, "n:m bf16": {torch.float32, torch.bfloat16},
                    "spp fp32": {torch.float32}, "spp bf16": {torch.float32, torch.bfloat16}}
    with pytest.raises(RmtpError, match="precision: fp16 needs a CUDA device"):
        rmtp.prune(_vit(), "n:m", n=2, m=4, calibration=bundle.loader("calibration"), precision="fp16")
    with pytest.raises(RecipeError, match=r"steps\[0\]\.precision: fp16 needs a CUDA device"):
        parse_recipe(tiny_recipe([{"prune": "spp", "params": {"ratio": 0.3}, "precision": "fp16"}]))
