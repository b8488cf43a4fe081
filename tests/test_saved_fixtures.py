"""Output folders written by an earlier rmtp still load, to the same outputs.

tests/fixtures/saved/ holds one tiny folder per kind of replaced layer and forward-pass patch,
written by tests/fixtures/make_saved_fixtures.py with the rmtp of the commit that added them
(format 1 and 2: types named by Python import path). A user's folders are exactly such files, so
a rename, a new type id or a changed config key must keep these loading: this test is the record
of that promise, and the fixtures must never be regenerated to make it pass. Later formats are
recorded the same way, by new folders (``spp-tome-deit``: format 3, type ids, records naming their
architecture).

Logits are compared to ``atol=1e-6`` (``rtol=0``), not bit for bit: they were computed on one CPU
with one torch build, and another CPU's kernels may round the same sums differently in the last
bit (the stored logits are below 4 in magnitude, where a float32 ulp is at most 2.4e-7). Any real
loading error (a layer missing, a permutation or patch not re-applied, weights in the wrong place)
moves them by far more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import rmtp
from rmtp.contract.saved_types import patches_of

SAVED = Path(__file__).resolve().parent / "fixtures" / "saved"
EXPECTED_FILE = "expected.safetensors"
NAMES = ["magnitude-vit", "nm-resnet", "nm-vit", "spp-convnext", "spp-resnet", "spp-tome-vit", "spp-vit",
         "svd-mp-resnet", "svd-mp-vit", "token-cls-vit", "tome-vit"]
#: Folders of format 3 (type ids), written later: records that name their architecture (``arch``).
NAMES_FORMAT_3 = ["spp-tome-deit", "int8-vit"]
#: Fixtures whose logits come from PyTorch's x86 int8 kernel: another quantized engine (qnnpack on
#: ARM) rounds the activations its own way, so there only the structure is compared.
X86_INT8_LOGITS = {"int8-vit"}


def test_every_fixture_is_there() -> None:
    assert sorted(p.name for p in SAVED.iterdir() if p.is_dir()) == sorted(NAMES + NAMES_FORMAT_3)


@pytest.mark.parametrize("name", NAMES + NAMES_FORMAT_3)
def test_a_folder_saved_by_an_earlier_rmtp_loads_to_its_outputs(name: str) -> None:
    folder = SAVED / name
    expected = load_file(folder / EXPECTED_FILE)
    with safe_open(folder / EXPECTED_FILE, framework="pt") as handle:
        notes = handle.metadata()
    loaded = rmtp.load(folder)
    expected_formats = (1, 2) if name in NAMES else (3,)  # before type ids, then with them
    assert loaded.meta["format_version"] in expected_formats
    for path, cls_name in json.loads(notes["classes"]).items():
        assert type(loaded.model.get_submodule(path)).__qualname__ == cls_name, path
    assert [type(p).__qualname__ for p in patches_of(loaded.model)] == json.loads(notes["patches"])
    if name in X86_INT8_LOGITS and torch.backends.quantized.engine not in ("x86", "fbgemm"):
        pytest.skip(f"{name}'s logits are the x86 int8 kernel's; this torch runs {torch.backends.quantized.engine}")
    with torch.no_grad():
        logits = loaded.model(expected["input"])
    assert expected["logits"].abs().max() < 4
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
