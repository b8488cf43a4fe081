"""``rmtp analyze-spectrum`` end to end: every kind of CKPT, the outputs, and one-line errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO, TINY_VIT
from typer.testing import CliRunner

from rmtp.cli import build_app
from rmtp.cli.spectrum import parse_kwargs
from rmtp.contract.architecture import ModelSpec
from rmtp.errors import RmtpError
from rmtp.plugins import get_plugins
from rmtp.storage.saving import save
from rmtp_plugins.svd_mp.lowrank import LowRankLinear

runner = CliRunner()
DIGITS = REPO / "models" / "digits_vit.safetensors"
TINY_KWARGS = json.dumps(TINY_VIT)


def invoke(*args: str):
    return runner.invoke(build_app(), ["analyze-spectrum", *map(str, args)])


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_reference_checkpoint_with_its_card_and_every_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke(DIGITS, "--json", out / "s.json", "--csv", out / "s.csv")
    assert result.exit_code == 0, result.output
    for text in ("model from card", "digits_vit.json", "blocks.0.attn.qkv[q]", "blocks.5.mlp.fc2", "96×384",
                 "skipped head (10×96): too small", "36 analysed, 2 skipped", "a full MP split would keep",
                 "α 0.25 · edge margin none"):
        assert text in result.output, text
    report = json.loads((out / "s.json").read_text())
    assert report["schema"] == "rmtp-spectrum-report/1" and report["kind"] == "checkpoint"
    assert report["model"]["name"] == "vit_tiny_patch16_224" and report["model"]["kwargs"]["embed_dim"] == 96
    assert len(report["layers"]) == 38 and report["summary"]["analysed"] == 36
    assert report["summary"]["params_kept_by_split"] == sum(row["params_kept_by_split"] for row in report["layers"]
                                                            if row["fit"])
    rows = list(csv.DictReader((out / "s.csv").open()))
    assert [row["name"] for row in rows] == [row["name"] for row in report["layers"]]
    q = rows[1]
    assert q["name"] == "blocks.0.attn.qkv[q]" and (q["rows_start"], q["rows_stop"], q["M"], q["N"]) == (
        "0", "96", "96", "96")
    assert int(q["rank"]) == report["layers"][1]["fit"]["rank"] and q["bulk_is_mp"] == "True"
    assert rows[-1]["skipped"].startswith("too small")
    assert not list(out.glob(".*.tmp"))  # written atomically: no temporary left behind
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "s.csv").stat().st_mode & 0o777 == 0o666 & ~mask


def test_timm_name_with_kwargs_plots_and_options(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    result = invoke("timm:vit_tiny_patch16_224", "--kwargs", "img_size=16,patch_size=4,depth=2,embed_dim=32",
                    "--kwargs", '{"num_heads": 2, "num_classes": 10, "in_chans": 1}', "--plot", plots,
                    "--tw-confidence", "0.95", "--alpha", "0.2", "--quiet")
    assert result.exit_code == 0, result.output
    assert "random init" in result.output and "edge margin TW1 at 0.95" not in result.output  # --quiet: no table
    assert "12 analysed, 2 skipped" in result.output
    files = sorted(p.name for p in plots.iterdir() if p.suffix == ".png")
    assert len(files) == 13 and "overview.png" in files and "001_blocks.0.attn.qkv-q.png" in files
    assert sorted(json.loads((plots / "rmtp_figures.json").read_text())["files"]) == files
    assert all((plots / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def test_no_split_qkv_and_min_dim() -> None:
    result = invoke("timm:vit_tiny_patch16_224", "--kwargs", TINY_KWARGS, "--no-split-qkv", "--min-dim", "8")
    assert result.exit_code == 0, result.output
    assert "blocks.0.attn.qkv " in result.output and "96×32" in result.output and "[q]" not in result.output
    assert "qkv as one matrix" in result.output and "head" in result.output


def test_bare_checkpoint_by_key_or_with_a_model_name(tmp_path: Path) -> None:
    bare = tmp_path / "weights.safetensors"
    shutil.copy(DIGITS, bare)
    result = invoke(bare)  # no name, card or config.json: analysed by state-dict key
    assert result.exit_code == 0, result.output
    assert "no architecture known" in result.output and "blocks.0.attn.qkv.weight[q]" in result.output
    line = one_error_line(invoke(bare, "--kwargs", TINY_KWARGS))  # kwargs of which model?
    assert "which timm model is this checkpoint? pass --model NAME" in line and "weights.json" in line
    card = json.loads((REPO / "models" / "digits_vit.json").read_text())
    result = invoke(bare, "--model", card["timm_name"], "--kwargs", json.dumps(card["kwargs"]))
    assert result.exit_code == 0, result.output
    assert "36 analysed" in result.output
    line = one_error_line(invoke(bare, "--model", card["timm_name"]))  # default kwargs do not fit the checkpoint
    assert "does not fit the model" in line


def test_saved_rmtp_folder_with_a_split_layer(tmp_path: Path) -> None:
    spec = ModelSpec(name="vit_tiny_patch16_224", kwargs=dict(TINY_VIT))
    arch = get_plugins().architecture_for(spec.name)
    model = arch.create(spec)
    model.blocks[0].mlp.fc1 = LowRankLinear(32, 4, 128)
    folder = save(model, tmp_path / "run", spec=spec, arch=arch)
    result = invoke(folder, "--min-dim", "8")
    assert result.exit_code == 0, result.output
    assert "blocks.1.mlp.fc2" in result.output and f"from {folder}" in result.output
    assert "skipped blocks.0.mlp.fc1: replaced by LowRankLinear (rank 4, 128×32)" in result.output
    line = one_error_line(invoke(folder, "--model", "vit_small_patch16_224"))
    assert "records its own model; drop --model" in line


def _file(name: str, content: bytes):
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(content)
        return folder / name
    return make


@pytest.mark.parametrize(("make", "message"), [
    (_file("x.safetensors", b"\x00garbage" * 10), "not a valid safetensors file"),
    (_file("x.pth", b"PK\x03\x04 not a zip"), "not a readable PyTorch checkpoint"),
    (_file("notes.txt", b"hello"), "unknown file type '.txt'"),
    (lambda folder: folder / "missing.safetensors", "does not exist"),
    (lambda folder: folder, "not an rmtp model folder"),
], ids=["corrupt-safetensors", "corrupt-pth", "text-file", "missing", "plain-folder"])
def test_corrupt_or_foreign_input_is_one_line_exit_1(tmp_path: Path, make, message: str) -> None:
    assert message in one_error_line(invoke(make(tmp_path)))


@pytest.mark.parametrize(("args", "message"), [
    (["--tw-confidence", "0.5"], "opposite of conservative"),
    (["--alpha", "0.6"], "alpha must be in [0, 0.5)"),
    (["--min-dim", "0"], "min_dim must be at least 1"),
    (["--kwargs", "{bad json"], "--kwargs: not a valid JSON object"),
    (["--kwargs", "img_size"], "--kwargs: expected key=value"),
    (["--arch", "nope"], "unknown architecture 'nope'"),
])
def test_bad_options_are_one_line_exit_1(args: list[str], message: str) -> None:
    assert message in one_error_line(invoke("timm:vit_tiny_patch16_224", "--kwargs", TINY_KWARGS, *args))


def test_unknown_timm_model_and_pretrained_with_a_checkpoint() -> None:
    assert "timm has no model 'vit_nonexistent'" in one_error_line(invoke("timm:vit_nonexistent"))
    assert "--pretrained fetches timm's weights" in one_error_line(invoke(DIGITS, "--pretrained"))


def test_parse_kwargs() -> None:
    assert parse_kwargs(None) is None
    assert parse_kwargs(["a=1,b=2.5,c=true,d=x", '{"e": [1, 2]}', "a=3"]) == {"a": 3, "b": 2.5, "c": True, "d": "x",
                                                                              "e": [1, 2]}
    with pytest.raises(RmtpError, match="expected key=value, got '=1'"):
        parse_kwargs(['{"a": 1}', "=1"])


def test_help_mentions_the_model_card() -> None:
    result = runner.invoke(build_app(), ["analyze-spectrum", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    assert "timm:NAME" in text and "<ckpt stem>.json" in text and "models/digits_vit.json" in text
