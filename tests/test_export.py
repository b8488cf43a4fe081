"""rmtp export: every pruner's output written as ONNX and pt2, run by a real runtime, and refusals.

Each saved fixture (tests/fixtures/saved/: one tiny folder per kind of replaced layer and patch)
is exported in both formats; the file is then run here, apart from export_model's own check
(onnxruntime, or torch.export.load), on the fixture's stored input and compared with the PyTorch
model and with the stored logits.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe, write_recipe
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import rmtp
from rmtp.errors import RmtpError
from rmtp.export import TOLERANCE, ExportError, ExportReport, export_model

ort = pytest.importorskip("onnxruntime")

SAVED = Path(__file__).resolve().parent / "fixtures" / "saved"
#: Saved kinds no exporter can carry (their refusal is tested below).
NOT_EXPORTABLE = ["int8-vit"]
NAMES = sorted(p.name for p in SAVED.iterdir() if p.is_dir() and p.name not in NOT_EXPORTABLE)


def run_file(path: Path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """The exported file run by its runtime: onnxruntime on the CPU, or the reloaded pt2 program."""
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with open(path, "rb") as handle:
        return torch.export.load(handle).module()(x)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_there_is_a_fixture_per_pruner_kind() -> None:
    assert len(NAMES) == 12  # 11 kinds of replaced layer and patch, and a distilled DeiT (spp heads + tome)
    assert all((SAVED / name).is_dir() for name in NOT_EXPORTABLE)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_saved_int8_model_is_refused_in_one_line_and_nothing_is_written(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"model.{fmt}"
    with pytest.raises(ExportError) as info:
        export_model(SAVED / "int8-vit", out, format=fmt)
    message = str(info.value)
    assert "\n" not in message and "int8 layers" in message and "blocks.0.attn.qkv" in message, message
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("name", NAMES)
def test_every_saved_pruner_output_exports_and_runs_in_its_runtime(tmp_path: Path, name: str, fmt: str) -> None:
    expected = load_file(SAVED / name / "expected.safetensors")
    x = expected["input"]
    out = tmp_path / f"model.{fmt}"
    report = export_model(SAVED / name, out, format=fmt, batch=x.shape[0], input_shape=x.shape[1:])
    assert report.path == out and report.bytes == out.stat().st_size > 0
    assert report.format == fmt and report.batch == x.shape[0] and report.input_shape == tuple(x.shape[1:])
    assert report.max_abs_diff <= TOLERANCE and "random" in report.inputs
    assert leftovers(tmp_path) == []
    with torch.no_grad():
        y = run_file(out, fmt, x)
        reference = rmtp.load(SAVED / name).model(x)
    assert y.shape == expected["logits"].shape
    assert float((y - reference).abs().max()) <= TOLERANCE
    assert float((y - expected["logits"]).abs().max()) <= TOLERANCE


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run: the tiny ViT (random init), magnitude masks then ToMe, saved with its digits recipe.

    Not svd-mp before ToMe here: on an untrained ViT every weight is MP noise, svd-mp keeps rank ~1,
    and ToMe's similarities then all tie at ±1 to float rounding, so which tokens merge is decided by
    the runtime's rounding (the trained digits ViT's svd-mp + tome exports within 4e-6: the benchmark).
    """
    from rmtp.run.pipeline import run_recipe
    from rmtp.run.recipe import load_recipe

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    recipe = tiny_recipe([{"prune": "magnitude", "params": {"sparsity": 0.3}}, {"prune": "tome", "params": {"r": 2}}],
                         output=root / "run")
    recipe["data"]["eval_limit"] = 64
    run_recipe(load_recipe(write_recipe(root / "r.yaml", recipe)))
    return root / "run"


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_check_compares_on_real_val_images(tmp_path: Path, run_folder: Path, fmt: str) -> None:
    out = tmp_path / f"model.{fmt}"
    report = export_model(run_folder, out, format=fmt, batch=4, check=True, check_images=16)
    assert report.inputs == "val images" and report.images == 16 and report.input_shape == (1, 16, 16)
    assert report.max_abs_diff <= TOLERANCE
    data = json.loads(json.dumps(report.to_dict()))
    assert data["path"] == str(out) and data["input_shape"] == [1, 16, 16] and data["images"] == 16
    assert isinstance(report, ExportReport) and report.exporter and report.seconds > 0
    loaded = rmtp.load(run_folder)
    from rmtp.data import DataSpec, build_data
    val = build_data(DataSpec(name="digits", eval_limit=64), loaded.model).val
    x = torch.stack([val[i][0] for i in range(4, 8)])
    with torch.no_grad():
        assert float((run_file(out, fmt, x) - loaded.model(x)).abs().max()) <= TOLERANCE


def test_an_nn_module_exports_with_an_explicit_input_shape_and_random_inputs(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).train()
    report = export_model(model, tmp_path / "m.onnx", format="onnx", batch=2, check=True, check_images=6,
                          input_shape=(1, 6, 6))
    assert report.images == 6 and "random" in report.inputs and "nn.Module" in report.inputs
    assert model.training, "the model's mode is restored"
    with pytest.raises(ExportError, match=r"input_shape=\(C, H, W\)"):
        export_model(model, tmp_path / "m2.onnx", format="onnx")


def test_an_eva_model_exports_to_onnx_and_its_fused_attention_is_restored(tmp_path: Path) -> None:
    """torch's TorchScript exporter cannot trace the fused attention call of timm's Eva (``is_causal``
    reaches the kernel as a tensor); the export goes through the explicit path, which the exporter
    writes with the same ops, and puts ``fused_attn`` back."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3", img_size=32, patch_size=8, depth=2, embed_dim=32,
                              num_heads=2, num_classes=10).eval()
    fused = [blk.attn.fused_attn for blk in model.blocks]
    report = export_model(model, tmp_path / "eva.onnx", format="onnx", check=True, input_shape=(3, 32, 32))
    assert report.max_abs_diff <= TOLERANCE
    assert [blk.attn.fused_attn for blk in model.blocks] == fused
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(run_file(tmp_path / "eva.onnx", "onnx", x), model(x), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("pool", ["avg", "map"])
def test_tome_on_a_vit_without_prefix_tokens_exports_to_onnx(tmp_path: Path, pool: str) -> None:
    """No class token (SigLIP-style, average or attention pool): ToMe's merge used to put an empty
    prefix block in front of the kept tokens, whose ONNX graph onnxruntime refused ("Incompatible
    dimensions")."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32,
                              num_heads=2, num_classes=10, class_token=False, global_pool=pool).eval()
    rmtp.prune(model, "tome", arch="vit", r=3)
    report = export_model(model, tmp_path / "tome.onnx", format="onnx", check=True, input_shape=(3, 32, 32))
    assert report.max_abs_diff <= TOLERANCE


# ------------------------------------------------------------------------------------ refusals


def test_an_unknown_format_is_refused_before_anything(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="choose one of onnx, pt2"):
        export_model(SAVED / "svd-mp-vit", tmp_path / "model.tflite", format="tflite")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_an_unwritable_target_is_refused_and_nothing_is_written(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(RmtpError, match="a-file is a file, not a folder"):
        export_model(SAVED / "svd-mp-vit", tmp_path / "a-file" / f"model.{fmt}", format=fmt)
    with pytest.raises(RmtpError, match="not writable"):
        export_model(SAVED / "svd-mp-vit", Path("/proc/rmtp-test") / f"model.{fmt}", format=fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def _semi_structured_linear() -> nn.Linear:
    """A Linear holding a real ``torch.sparse`` 2:4 semi-structured weight (the CUTLASS layout),
    built on the CPU from its packed parts; no kernel runs on it here, so no GPU is needed."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "prototype stage"
        weight = SparseSemiStructuredTensorCUTLASS(torch.Size([32, 64]), torch.zeros(32, 32),
                                                   torch.zeros(32, 4, dtype=torch.int16), None, None, None)
    layer = nn.Linear(64, 32)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_semi_structured_weights_are_refused_with_the_reason(tmp_path: Path, fmt: str) -> None:
    model = nn.Sequential(nn.Flatten(), _semi_structured_linear())
    with pytest.raises(ExportError) as caught:
        export_model(model, tmp_path / f"model.{fmt}", format=fmt, input_shape=(1, 8, 8))
    message = str(caught.value)
    assert "\n" not in message and "1.weight" in message and "2:4 semi-structured" in message and "CUDA" in message
    assert list(tmp_path.iterdir()) == []


def test_weights_off_the_cpu_or_not_fp32_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"weights are bfloat16 \(e.g. weight\); .*model.float\(\)"):
        export_model(nn.Linear(4, 2).to(torch.bfloat16), tmp_path / "m.pt2", format="pt2", input_shape=(1, 1, 4))
    with pytest.raises(ExportError, match=r"weights are on meta .*model.cpu\(\)"):
        export_model(nn.Linear(4, 2, device="meta"), tmp_path / "m.pt2", format="pt2", input_shape=(1, 1, 4))
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "notes.onnx"
    out.write_bytes(b"someone's unrelated file")
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ExportError, match=r"notes\.onnx: already exists; nothing was written .*--overwrite"):
        export_model(model, out, format="onnx", input_shape=(1, 2, 2))
    assert out.read_bytes() == b"someone's unrelated file" and leftovers(tmp_path) == []
    export_model(model, out, format="onnx", input_shape=(1, 2, 2), overwrite=True)
    assert out.read_bytes() != b"someone's unrelated file"


class _Greedy(nn.Module):
    """Above batch 1 its forward asks the real CPU allocator for 16 TiB per image: an out-of-memory
    error at once, nothing actually allocated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            torch.empty(x.shape[0] * 2**44, dtype=torch.uint8)
        return x.flatten(1)


def test_a_batch_too_large_is_refused_or_one_line_out_of_memory(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"export batch must be a whole number 1\.\.4096, got 100000"):
        export_model(_Greedy(), tmp_path / "m.pt2", format="pt2", batch=100_000, input_shape=(1, 2, 2))
    with pytest.raises(ExportError, match=r"export batch 8 does not fit in CPU memory \(tried to allocate \d+ "
                                          r"bytes\); nothing was written; try a smaller --batch"):
        export_model(_Greedy(), tmp_path / "m.pt2", format="pt2", batch=8, input_shape=(1, 2, 2))
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_file_source_a_huge_batch_and_an_existing_output(tmp_path: Path) -> None:
    checkpoint = Path(__file__).resolve().parents[1] / "models" / "digits_vit.safetensors"
    out = tmp_path / "x.onnx"
    line = one_error_line(invoke("export", checkpoint, "-f", "onnx", "-o", out))
    assert line.endswith("digits_vit.safetensors: a file, not an rmtp output folder (a folder with rmtp_model.json)")
    folder = SAVED / "svd-mp-vit"
    line = one_error_line(invoke("export", folder, "-f", "onnx", "-o", out, "--batch", "100000"))
    assert line == "error: export batch must be a whole number 1..4096, got 100000"
    out.write_text("keep me")
    assert "already exists" in one_error_line(invoke("export", folder, "-f", "onnx", "-o", out))
    assert out.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]


def test_check_images_are_bounded_like_the_batch(tmp_path: Path) -> None:
    """Every check image is held in memory at once: a typo must be one line, not a full machine."""
    with pytest.raises(ExportError, match=r"export check_images must be a whole number 1\.\.4096, got 100000"):
        export_model(_Greedy(), tmp_path / "m.pt2", format="pt2", check=True, check_images=100_000,
                     input_shape=(1, 2, 2))
    line = one_error_line(invoke("export", SAVED / "svd-mp-vit", "-f", "onnx", "-o", tmp_path / "x.onnx", "--check",
                                 "--check-images", "100000"))
    assert line == "error: export check_images must be a whole number 1..4096, got 100000"
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_existing_json_report_without_overwrite(tmp_path: Path) -> None:
    folder = shutil.copytree(SAVED / "svd-mp-vit", tmp_path / "run")
    report = tmp_path / "export.json"
    report.write_text("keep me")
    line = one_error_line(invoke("export", folder, "-f", "onnx", "--json", report))
    assert line == f"error: --json: {report}: already exists; nothing was written (--overwrite replaces it)"
    assert report.read_text() == "keep me" and not (folder / "model.onnx").exists()  # refused before exporting
    result = invoke("export", folder, "-f", "onnx", "--json", report, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["path"] == str(folder / "model.onnx")


def test_cli_refuses_a_json_report_on_the_models_own_path(tmp_path: Path) -> None:
    folder = shutil.copytree(SAVED / "svd-mp-vit", tmp_path / "run")
    target = tmp_path / "model.onnx"
    line = one_error_line(invoke("export", folder, "-f", "onnx", "-o", target, "--json", target, "--overwrite"))
    assert line == (f"error: --json {target} is the exported model's own path: the report would replace the model; "
                    f"name another file")
    assert not target.exists()


class _TracedBranch(nn.Module):
    """Python control flow on a tensor's value: tracing bakes in the branch the example input took,
    so the ONNX graph computes something else for inputs that take the other one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if bool(x.sum() > 0) else x * 3


def test_a_failed_verification_keeps_the_previous_file_and_leaves_no_temp(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous export")
    with pytest.raises(ExportError, match=r"onnxruntime: max \|difference\| .* > 0.0001"):
        export_model(_TracedBranch(), out, format="onnx", check=True, check_images=16, input_shape=(1, 2, 2),
                     overwrite=True)
    assert out.read_bytes() == b"the previous export" and leftovers(tmp_path) == []
    out = tmp_path / "model.pt2"
    out.write_bytes(b"the previous export")
    with pytest.raises(ExportError, match="torch.export cannot export this model"):  # data-dependent branch
        export_model(_TracedBranch(), out, format="pt2", input_shape=(1, 2, 2), overwrite=True)
    assert out.read_bytes() == b"the previous export" and leftovers(tmp_path) == []


def test_onnx_without_onnxruntime_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ExportError, match=r'pip install "rmtp\[export\]"'):
        export_model(SAVED / "svd-mp-vit", tmp_path / "model.onnx", format="onnx")
    assert list(tmp_path.iterdir()) == []


def test_token_order_under_onnx_export_is_the_stable_sort_on_ties(tmp_path: Path) -> None:
    """ToMe and token-cls rank tokens with a stable sort; exported, that is a TopK that onnxruntime
    must break ties in the same way (lower index first)."""
    from rmtp_plugins.tokens.merge import descending_order

    class Order(nn.Module):
        def forward(self, scores: torch.Tensor) -> torch.Tensor:
            return descending_order(scores).float()

    scores = torch.randint(0, 3, (4, 1, 1, 50)).float()  # many ties
    export_model(Order(), tmp_path / "order.onnx", format="onnx", batch=4, input_shape=(1, 1, 50))
    got = run_file(tmp_path / "order.onnx", "onnx", scores)
    assert torch.equal(got.long(), torch.sort(scores, dim=-1, descending=True, stable=True).indices)


# ------------------------------------------------------------------------------------------ CLI


def invoke(*args: str):
    from rmtp.cli import build_app

    return CliRunner().invoke(build_app(), [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_cli_writes_model_file_into_the_run_folder_by_default(tmp_path: Path) -> None:
    fmt = "onnx"  # pt2 through the CLI: test_cli_errors_are_one_line_and_write_nothing and the library tests
    folder = shutil.copytree(SAVED / "tome-vit", tmp_path / "run")
    result = invoke("export", folder, "--format", fmt, "--batch", "3")
    assert result.exit_code == 0, result.output
    out = folder / f"model.{fmt}"
    assert f"model.{fmt}" in result.output and "3 × 1 × 12 × 12" in result.output and "max |diff|" in result.output
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        assert float((run_file(out, fmt, x) - rmtp.load(folder).model(x)).abs().max()) <= TOLERANCE


def test_cli_check_on_a_run_with_json(tmp_path: Path, run_folder: Path) -> None:
    out, report = tmp_path / "deploy" / "vit.onnx", tmp_path / "export.json"
    result = invoke("export", run_folder, "-f", "onnx", "-o", out, "--batch", "8", "--check", "--check-images", "16",
                    "--json", report)
    assert result.exit_code == 0, result.output
    assert "16 val images" in result.output
    data = json.loads(report.read_text())
    assert (data["path"] == str(out) and data["images"] == 16 and data["batch"] == 8
            and data["max_abs_diff"] <= TOLERANCE)
    assert out.stat().st_size == data["bytes"]


def test_cli_errors_are_one_line_and_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = shutil.copytree(SAVED / "svd-mp-vit", tmp_path / "run")
    before = sorted(p.name for p in folder.iterdir())
    assert one_error_line(invoke("export", folder, "--format", "tflite")) == \
        "error: --format tflite: choose one of onnx, pt2"
    assert "not writable" in one_error_line(invoke("export", folder, "--format", "pt2", "-o", "/proc/rmtp-test/m.pt2"))
    assert "not writable" in one_error_line(
        invoke("export", folder, "--format", "pt2", "--json", "/proc/rmtp-test/r.json"))
    assert "no rmtp_model.json" in one_error_line(
        invoke("export", tmp_path, "--format", "pt2", "-o", tmp_path / "m.pt2"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    line = one_error_line(invoke("export", folder, "--format", "onnx"))
    assert line.endswith('pip install "rmtp[export]"')
    assert sorted(p.name for p in folder.iterdir()) == before
