"""What ``export_model`` accepts: the formats and options, and the models no exporter can write."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from rmtp.errors import RmtpError, short_repr
from rmtp.storage.atomic import check_writable

Format = Literal["onnx", "pt2"]
FORMATS: tuple[str, ...] = ("onnx", "pt2")
#: Largest max |exported − PyTorch| accepted, on fp32 logits.
TOLERANCE = 1e-4
#: ONNX opset written by default: 17 has LayerNormalization as one op (and SDPA needs >= 14).
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 14, 20  # what torch's TorchScript exporter writes for these models
#: protobuf's hard limit on one message: an ONNX file above it needs external data files.
ONNX_LIMIT_BYTES = 2 * 1024**3
INSTALL_HINT = 'pip install "rmtp[export]"'
#: Largest static batch an exported graph may have: above it a deployment graph is implausible, and
#: the forward passes that trace and check it would ask the allocator for tens of GB (a
#: ``--batch 100000`` typo). The same bound as a recipe's ``data.batch_size``.
MAX_BATCH = 4096
#: Most val images ``check`` compares on: they and the model's outputs on them are all held in memory
#: at once (at 3×224×224, 4096 images take 2.5 GB), and the check is of exactness, not of accuracy, so
#: a few thousand images say all it can; a ``--check-images 1000000`` typo must not fill the machine.
MAX_CHECK_IMAGES = 4096


class ExportError(RmtpError):
    """A model could not be exported, or its exported file does not compute what the model does."""


def export_problems(model: nn.Module, format: str = "onnx") -> list[str]:
    """Why ``model`` cannot be exported to ``format`` (empty when it can), one reason per kind."""
    from torch.sparse import SparseSemiStructuredTensor

    semi, sparse, devices, dtypes = [], [], {}, {}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if isinstance(tensor, SparseSemiStructuredTensor) or isinstance(getattr(tensor, "data", None),
                                                                         SparseSemiStructuredTensor):
            semi.append(name)
        elif tensor.layout != torch.strided:
            sparse.append(f"{name} ({str(tensor.layout).replace('torch.', '')})")
        elif tensor.device.type != "cpu":
            devices.setdefault(str(tensor.device), name)
        elif tensor.is_floating_point() and tensor.dtype != torch.float32:
            dtypes.setdefault(str(tensor.dtype).replace("torch.", ""), name)
    problems = []
    # A replacement layer that runs a kernel no exporter carries says so (int8's ``export_refusal``).
    refused: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        why = getattr(type(module), "export_refusal", None)
        if isinstance(why, str):
            refused.setdefault(why, []).append(name)
    problems.extend(f"{_few(names)}: {why}" for why, names in refused.items())
    if semi:
        problems.append(f"{_few(semi)} hold 2:4 semi-structured sparse weights (torch.sparse), which run only on "
                        f"CUDA sparse tensor cores and which neither ONNX nor torch.export can write; export the "
                        f"model before to_semi_structured (its dense weights with zeros export)")
    if sparse:
        problems.append(f"{_few(sparse)} are torch.sparse tensors, which the exporters cannot write; "
                        f"export the dense model (.to_dense())")
    if devices:
        problems.append(f"weights are on {', '.join(devices)} (e.g. {next(iter(devices.values()))}); export "
                        f"runs and checks on the CPU: model.cpu() first")
    if dtypes:
        problems.append(f"weights are {', '.join(dtypes)} (e.g. {next(iter(dtypes.values()))}); export writes "
                        f"and checks float32 models: model.float() first")
    if format == "onnx" and not semi and not sparse:
        size = sum(t.numel() * t.element_size() for _, t in tensors)
        if size > ONNX_LIMIT_BYTES:
            problems.append(f"its weights take {size / 1e9:.1f} GB and an ONNX file holds at most 2 GB (protobuf); "
                            f"larger ones need external data files, which rmtp export does not write: use "
                            f"--format pt2")
    return problems


def check_new_file(path: Path | str, *, what: str, overwrite: bool, replaced_by: str) -> None:
    """Refuse, before anything is exported, a file path that cannot be written, or that names an
    existing file without ``overwrite``: ``-o`` or ``--json`` naming the wrong file by mistake must
    not destroy it. ``replaced_by`` says what would replace it (the option's name)."""
    check_writable(path, what=what, is_dir=False)
    if not overwrite and os.path.lexists(path):
        raise ExportError(f"{what}: {path}: already exists; nothing was written ({replaced_by} replaces it)")


def check_options(fmt: object, batch: object, check_images: object, opset: object) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"export format {short_repr(fmt)}: choose one of {', '.join(FORMATS)}")
    for name, value, high in (("batch", batch, MAX_BATCH), ("check_images", check_images, MAX_CHECK_IMAGES)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
            raise ExportError(f"export {name} must be a whole number 1..{high}, got {short_repr(value)}")
    if opset is not None:
        if fmt != "onnx":
            raise ExportError("export opset is for --format onnx only")
        if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
            raise ExportError(f"export opset must be {MIN_OPSET}..{MAX_OPSET}, got {short_repr(opset)}")
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ExportError(f"ONNX export is checked in onnxruntime, which is not installed: "
                              f"{INSTALL_HINT}") from None
    return str(fmt)


def _few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
