"""benchmarks/real_pretrained.py: its split, its decoded-image cache, its method table, and (slow,
where ``../shared/realdata`` exists) its whole run on the real ViT-Ti at a tiny setting.

No test asserts a timing or an accuracy figure of the real model: those are the benchmark's
results (benchmarks/README.md), not properties of the code.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import write_png

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "real_pretrained.py"


def _load_script() -> ModuleType:
    """The benchmark script as a module (registered first: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("real_pretrained", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_script()
REALDATA_MISSING = not (bench.DEFAULT_CHECKPOINT.is_dir() and bench.DEFAULT_IMAGES.is_dir())


# ------------------------------------------------------------------------------------------ the split

def test_split_is_disjoint_complete_and_seeded() -> None:
    split = bench.split_indices(50, 12, seed=3)
    assert len(split.calibration) == 12 and len(split.evaluation) == 38
    assert not set(split.calibration) & set(split.evaluation)
    assert sorted(split.calibration + split.evaluation) == list(range(50))
    assert bench.split_indices(50, 12, seed=3) == split  # deterministic
    assert bench.split_indices(50, 12, seed=4).calibration != split.calibration  # the seed matters
    # a larger calibration set is the same permutation read further: it contains the smaller one
    assert set(split.calibration) <= set(bench.split_indices(50, 20, seed=3).calibration)
    assert "12 of a seed-3 permutation of the 50" in split.describe(50)


def test_split_keeps_images_to_evaluate_on() -> None:
    with pytest.raises(SystemExit, match="--calibration 50"):
        bench.split_indices(50, 50, seed=0)
    assert bench.split_indices(5, 0, seed=0).evaluation == list(range(5))


# ------------------------------------------------------------------------------------------ the cache

@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes, two small PNGs each (and a hidden folder, which is not a class)."""
    root = tmp_path / "images"
    for c, name in enumerate(("b_class", "a_class")):
        for i in range(2):
            write_png(root / name / f"{i}.png", (20 + 3 * i, 24), seed=10 * c + i)
    (root / ".ipynb_checkpoints").mkdir()
    return root


def _transforms(crop_pct: float = 0.9) -> object:
    from rmtp.data import ImageTransforms

    return ImageTransforms(input_size=(3, 16, 16), interpolation="bicubic", crop_pct=crop_pct, crop_mode="center",
                           mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_tensor_cache_is_reused_and_matches_a_fresh_decode(image_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = bench.image_tensors(image_folder, _transforms(), cache, log=lambda _: None)
    assert not first.from_cache and first.cache_file is not None and first.cache_file.parent == cache
    assert first.images.shape == (4, 3, 16, 16)
    assert first.classes == ["a_class", "b_class"]  # sorted class folders give the labels
    assert first.labels.tolist() == [0, 0, 1, 1]
    second = bench.image_tensors(image_folder, _transforms(), cache, log=lambda _: None)
    assert second.from_cache and second.cache_file == first.cache_file
    assert torch.equal(second.images, first.images) and torch.equal(second.labels, first.labels)
    fresh = bench.image_tensors(image_folder, _transforms(), None)
    assert not fresh.from_cache and fresh.cache_file is None
    assert torch.equal(fresh.images, first.images)
    # the eval transform is timm's own, image by image
    from PIL import Image

    expected = _transforms().eval_transform()(Image.open(image_folder / "b_class" / "1.png").convert("RGB"))
    assert torch.equal(first.images[3], expected)


def test_tensor_cache_is_invalidated_by_a_changed_file_or_transform(image_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = bench.image_tensors(image_folder, _transforms(), cache, log=lambda _: None)
    write_png(image_folder / "a_class" / "0.png", (31, 29), seed=99)  # rewritten in place
    changed = bench.image_tensors(image_folder, _transforms(), cache, log=lambda _: None)
    assert not changed.from_cache and changed.cache_file != first.cache_file
    assert not torch.equal(changed.images[0], first.images[0])
    assert torch.equal(changed.images[1:], first.images[1:])
    other = bench.image_tensors(image_folder, _transforms(crop_pct=1.0), cache, log=lambda _: None)
    assert not other.from_cache and other.cache_file not in (first.cache_file, changed.cache_file)
    write_png(image_folder / "a_class" / "2.png", (20, 20), seed=7)  # an image added
    assert not bench.image_tensors(image_folder, _transforms(), cache, log=lambda _: None).from_cache


def test_a_foreign_or_damaged_cache_file_is_only_a_miss(image_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = bench.image_tensors(image_folder, _transforms(), cache, log=lambda _: None)
    first.cache_file.write_bytes(b"not a torch file")
    again = bench.image_tensors(image_folder, _transforms(), cache, log=lambda _: None)
    assert not again.from_cache and torch.equal(again.images, first.images)


def test_limit_takes_a_seeded_sample_in_folder_order(image_folder: Path) -> None:
    data = bench.image_tensors(image_folder, _transforms(), None, limit=3, seed=1)
    assert len(data.files) == 3 and data.files == sorted(data.files)
    assert bench.image_tensors(image_folder, _transforms(), None, limit=3, seed=1).files == data.files


def test_the_cache_is_never_in_the_repository() -> None:
    assert REPO not in bench.DEFAULT_CACHE.resolve().parents


# ------------------------------------------------------------------------------------------ the methods

def test_method_table_keys_are_unique_and_dense_always_comes_first() -> None:
    keys = [m.key for m in bench.METHODS]
    assert len(keys) == len(set(keys)) and keys[0] == "dense"
    chosen = bench.select_methods(["tome-r8", "magnitude-50"])
    assert [m.key for m in chosen] == ["dense", "magnitude-50", "tome-r8"]  # table order
    with pytest.raises(SystemExit, match="unknown nope"):
        bench.select_methods(["nope"])


def test_a_row_this_tree_cannot_run_is_skipped_with_its_reason() -> None:
    from rmtp.plugins import get_plugins

    plugins = get_plugins()
    assert bench.unavailable(bench.Method("dense", "dense", None), plugins) is None
    assert bench.unavailable(bench.Method("t", "tome", "tome", {"r": 8}), plugins) is None
    bad = bench.Method("x", "svd-mp new", "svd-mp", {"no_such_param": True}, pending="someone's branch")
    reason = bench.unavailable(bad, plugins)
    assert reason is not None and "no_such_param" in reason
    assert "waits for someone's branch" in bench.skip_reason(bad, reason)
    assert "unknown pruner" in bench.unavailable(bench.Method("y", "?", "no-such-pruner"), plugins)
    # a row that says it calibrates, on a pruner that is never handed calibration images
    calibrated = bench.Method("z", "tome", "tome", {"r": 8}, calibrate=True)
    assert "takes no calibration images" in bench.unavailable(calibrated, plugins)


def test_every_default_row_that_is_not_pending_runs_in_this_tree() -> None:
    from rmtp.plugins import get_plugins

    plugins = get_plugins()
    for method in bench.METHODS:
        if not method.pending:
            assert bench.unavailable(method, plugins) is None, method.key


def test_a_distilled_row_trains_on_the_calibration_images_only_and_leaves_dense_alone() -> None:
    """A KD row: the pruner, then rmtp.finetune from dense on the calibration loader (labels unused):
    the model's weights move, dense's do not, and the row counts the images it trained on."""
    import timm
    from torch.utils.data import DataLoader, TensorDataset

    from rmtp.plugins import get_plugins

    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=10).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    images = torch.randn(16, 3, 32, 32)
    loader = DataLoader(TensorDataset(images, torch.full((16,), -1)), batch_size=8)
    kd = {"epochs": 2, "lr": 1e-3, "distill": {"weight": 1.0}}
    plain = bench.Method("t", "tome r=2", "tome", {"r": 2})
    distilled = bench.Method("t+kd", "tome r=2 + KD", "tome", {"r": 2}, distill=kd)
    assert not plain.trains_on_calibration and distilled.trains_on_calibration
    shape = (3, 32, 32)
    zero_shot, _, _ = bench.compress(dense, plain, loader, seed=0, input_shape=shape, latency={"cost": "macs"})
    recovered, _, _ = bench.compress(dense, distilled, loader, seed=0, input_shape=shape, latency={"cost": "macs"})
    assert not recovered.training and not any(p.requires_grad for p in recovered.parameters())
    moved = [k for k, v in recovered.state_dict().items() if not torch.equal(v, zero_shot.state_dict()[k])]
    assert moved  # the distillation trained it
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())
    assert bench.unavailable(distilled, get_plugins()) is None


# ------------------------------------------------------------------------------------------ the output

def _row(key: str, top1: float, agreement: float, ratio: float, notes: list[str]) -> dict:
    spread = {"median": ratio, "q1": ratio - 0.05, "q3": ratio + 0.05, "min": ratio - 0.1, "max": ratio + 0.1, "n": 5}
    speed = {str(b): {"batch": b, "threads": 1, "rounds": 5, "ms": spread, "ratio": spread} for b in (32, 1)}
    return {"key": key, "label": key, "pruner": None, "params": {}, "calibrated_on_images": 0,
            "compression_seconds": 1.25, "params_count": 5_717_416, "nonzeros": 2_900_000, "macs": 1_258_000_000,
            "zero_shot": {"top1": top1, "agreement": agreement, "images": 744}, "speed": speed, "notes": notes}


def _result() -> dict:
    split = bench.split_indices(1000, 256, seed=0)
    return {"model": {"name": "vit_tiny_patch16_224", "source": "ckpt"},
            "images": {"count": 1000, "folder": "imgs"},
            "split": {"description": split.describe(1000), "evaluation_images": 744},
            "rows": [_row("dense", 80.0, 100.0, 1.0, []), _row("tome r=8", 79.5, 95.0, 1.4, ["a pruner's note"])],
            "skipped": [{"label": "new method", "reason": "not in this tree"}],
            "settings": {"rounds": 5, "timing_threads": 1, "work_threads": 2},
            "machine": {"cpu": "Some CPU", "usable_cores": 2, "torch": "2", "timm": "1", "rmtp_commit": "abcdef123",
                        "rmtp_uncommitted": []}}


def test_the_report_is_a_caption_a_markdown_table_and_what_was_left_out() -> None:
    text = bench.report_text(_result())
    caption, _, rest = text.partition("\n\n")
    assert "the first 256 of a seed-0 permutation of the 1000 images; evaluation: the other 744" in caption
    assert "1 thread" in caption and "Some CPU, 2 cores" in caption and "rmtp abcdef1." in caption
    table = [line for line in rest.splitlines() if line.startswith("|")]
    assert len(table) == 4 and all(line.count("|") == table[0].count("|") for line in table)
    assert "| tome r=8 | 79.50% | -0.50 | 95.0% | 5.72M | 2.90M | 1.26G | ×1.40 [1.35–1.45] |" in table[3]
    assert "- new method: skipped, not in this tree" in text and "- tome r=8: a pruner's note" in text


def test_the_figure_marks_dense_and_writes_atomically(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = bench.figure(_result(), tmp_path / "sub" / "figure.png")
    assert path == tmp_path / "sub" / "figure.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in path.parent.iterdir()] == ["figure.png"]  # no temp file left


def test_the_machine_record_names_the_commit_and_the_changed_library_files() -> None:
    state = bench.git_state()
    if state["rmtp_commit"] is None:
        pytest.skip("not a git checkout")
    assert len(state["rmtp_commit"]) == 40
    assert all(path.startswith(("rmtp/", "plugins/")) or path == "benchmarks/real_pretrained.py"
               for path in state["rmtp_uncommitted"])


# ------------------------------------------------------------------------------------------ clear refusals

def test_a_missing_checkpoint_or_image_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert bench.main(["--checkpoint", str(tmp_path / "no-model"), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-model: no such file or folder" in err
    from rmtp.errors import DataError

    with pytest.raises(DataError, match="no-images: no such folder"):
        bench.list_images(tmp_path / "no-images")
    assert not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------------------------------ the real model

@pytest.mark.slow
@pytest.mark.skipif(REALDATA_MISSING, reason=f"{bench.REALDATA} (the real ViT-Ti and ImageNet sample) is absent: "
                                             f"the real-model benchmark has nothing to run on")
def test_the_benchmark_runs_on_the_real_model_at_a_tiny_setting(tmp_path: Path) -> None:
    settings = bench.Settings(methods=["tome-r8", "nm-2:4-wanda"], calibration=16, limit=64, rounds=3,
                              latency_cost="macs", cache=tmp_path / "cache")
    result = bench.run(settings, log=lambda _: None)
    rows = {row["key"]: row for row in result["rows"]}
    assert list(rows) == ["dense", "nm-2:4-wanda", "tome-r8"]
    split = result["split"]
    assert (split["calibration_images"], split["evaluation_images"]) == (16, 48)
    assert result["images"]["classes"] == 1000 and result["images"]["count"] == 64
    assert rows["dense"]["zero_shot"]["agreement"] == 100.0
    assert rows["dense"]["zero_shot"]["images"] == 48
    assert rows["nm-2:4-wanda"]["calibrated_on_images"] == 16 and rows["tome-r8"]["calibrated_on_images"] == 0
    assert rows["nm-2:4-wanda"]["nonzeros"] < 0.7 * rows["dense"]["nonzeros"]  # half of the blocks' weights
    assert rows["tome-r8"]["macs"] < rows["dense"]["macs"]
    for row in rows.values():
        assert set(row["speed"]) == {"32", "1"} and row["speed"]["32"]["rounds"] == 3
    assert rows["dense"]["speed"]["32"]["ratio"]["median"] == 1.0
    json.dumps(result)  # JSON-ready as it is
    assert result["model"]["weights_sha256"].startswith("3f1f07da")  # the README's file
    assert result["machine"]["rmtp_commit"]
    # the cached tensors are the model's own eval transform, exactly (timm's resolve_data_config)
    import timm.data
    from PIL import Image

    model = bench.load_checkpoint(settings.checkpoint).model
    data = bench.image_tensors(settings.images, bench.eval_transforms(model, settings.images), settings.cache,
                               limit=64, seed=0)
    assert data.from_cache
    config = timm.data.resolve_data_config(model=model)
    assert (config["crop_pct"], config["interpolation"], tuple(config["mean"])) == (0.9, "bicubic", (0.5, 0.5, 0.5))
    plain = timm.data.create_transform(**config)(Image.open(settings.images / data.files[0]).convert("RGB"))
    assert torch.equal(data.images[0], plain)
    table = bench.markdown_table(result)
    assert table.count("\n") == 4 and "tome r=8" in table
    figure = bench.figure(result, tmp_path / "figure.png")
    assert figure is None or figure.stat().st_size > 0
