"""``export_model``: the source (a folder or a module), the inputs it is checked on, the atomic write."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from rmtp.errors import short_repr
from rmtp.export.refusals import (
    DEFAULT_OPSET,
    ExportError,
    Format,
    check_new_file,
    check_options,
    export_problems,
)
from rmtp.export.runtimes import discrete_hint, onnx_writer, ort_version, pt2_writer
from rmtp.run.oom import allocation_detail, is_out_of_memory
from rmtp.storage.atomic import replace_atomically, write_errors

if TYPE_CHECKING:
    from torch.utils.data import Dataset

_SEED = 0


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and how it was checked."""

    path: Path
    format: str
    bytes: int
    input_shape: tuple[int, ...]
    batch: int
    max_abs_diff: float
    images: int
    inputs: str
    exporter: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["input_shape"] = list(self.input_shape)
        return data


def export_model(source: str | os.PathLike | nn.Module, path: str | os.PathLike, *,
                 format: Format,
                 batch: int = 1, check: bool = False, check_images: int = 32, opset: int | None = None,
                 input_shape: Sequence[int] | None = None, overwrite: bool = False) -> ExportReport:
    """Write ``source`` to ``path`` as ``format`` (``"onnx"`` or ``"pt2"``), verified, atomically.

    ``source``: an rmtp output folder (loaded with :func:`rmtp.load`; its input shape is what its
    saved recipe's data gives the model, else :func:`rmtp.data.model_input_size`) or an
    ``nn.Module`` with ``input_shape`` ``(C, H, W)``. ``input_shape`` also overrides a folder's.
    ``batch``: the exported graph's (static) batch size. ``check``: compare outputs on
    ``check_images`` val images of the folder's dataset, in batches of ``batch`` (random inputs,
    said so in the report, when there is no data: an ``nn.Module``, a folder without a recipe).
    ``opset``: ONNX opset (default 17). ``overwrite``: replace an existing file at ``path``;
    without it an existing file is refused and left as it is (``-o`` naming an unrelated file by
    mistake must not destroy it). Raises :class:`ExportError` (one line) on a refusal, a failed
    export or a difference above :data:`TOLERANCE`.
    """
    started = time.perf_counter()
    fmt = check_options(format, batch, check_images, opset)
    path = Path(path)
    check_new_file(path, what="export", overwrite=overwrite,
                   replaced_by="overwrite=True, --overwrite on the command line,")
    model, shape, data, no_data = _source(source, input_shape, want_data=check)
    problems = export_problems(model, fmt)
    if problems:
        raise ExportError(f"cannot export {_name(source)} to {fmt}: " + "; ".join(problems))
    with _fits_in_memory(batch):
        inputs, described, opset_used, result = _write(model, source, fmt, path, data, no_data, shape, batch,
                                                       check_images if check else batch, opset)
    exporter = (f"torch.onnx.export (TorchScript, opset {opset_used}) + onnxruntime {ort_version()}"
                if fmt == "onnx" else f"torch.export (torch {torch.__version__.split('+')[0]})")
    return ExportReport(path=path, format=fmt, bytes=path.stat().st_size, input_shape=tuple(shape), batch=batch,
                        max_abs_diff=result["diff"], images=len(inputs) * batch, inputs=described,
                        exporter=exporter, seconds=round(time.perf_counter() - started, 3))


def _write(model: nn.Module, source: object, fmt: str, path: Path, data: Dataset | None, no_data: str,
           shape: tuple[int, ...], batch: int, count: int, opset: int | None
           ) -> tuple[list[Tensor], str, int, dict[str, float]]:
    """Run the model on its check inputs, export it and check the file, put in place only if it passes;
    (the inputs, how they are described, the opset, {"diff": max |difference|})."""
    inputs, described = _inputs(data, no_data, shape, batch, count)
    with _eval_mode(model), torch.no_grad():
        expected = [model(x) for x in inputs]
        for out in expected:
            if not isinstance(out, Tensor):
                raise ExportError(f"cannot export {_name(source)}: its forward returns {type(out).__name__}, "
                                  f"not one tensor")
        opset_used = opset or DEFAULT_OPSET
        hint = discrete_hint(model)
        writer = (onnx_writer(model, inputs, expected, opset_used, hint) if fmt == "onnx"
                  else pt2_writer(model, inputs, expected, hint))
        result: dict[str, float] = {}
        with write_errors("export", path, consequence="nothing was written"):
            replace_atomically(path, lambda tmp: result.update(diff=writer(tmp)))
    return inputs, described, opset_used, result


@contextlib.contextmanager
def _fits_in_memory(batch: int) -> Iterator[None]:
    """An allocator running out while the model runs, is exported or is checked means the batch is
    too large for this machine: one line saying so (the file is not written), not a traceback."""
    try:
        yield
    except (MemoryError, RuntimeError, ExportError) as exc:
        if not is_out_of_memory(exc):
            raise
        detail = allocation_detail(exc)
        raise ExportError(f"export batch {batch} does not fit in CPU memory{f' ({detail})' if detail else ''}; "
                          f"nothing was written; try a smaller --batch") from None


# ----------------------------------------------------------------------------------- the source


def _name(source: object) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def _source(source: object, input_shape: Sequence[int] | None, *, want_data: bool
            ) -> tuple[nn.Module, tuple[int, ...], Dataset | None, str]:
    """(model, (C, H, W), val images or None, why there are none)."""
    shape = _shape(input_shape) if input_shape is not None else None
    if isinstance(source, nn.Module):
        if shape is None:
            raise ExportError(f"export of an nn.Module ({type(source).__name__}) needs input_shape=(C, H, W)")
        return source, shape, None, "an nn.Module carries no data"
    if not isinstance(source, (str, os.PathLike)):
        raise ExportError(f"export source must be an rmtp output folder or an nn.Module, got {type(source).__name__}")
    from rmtp.data import build_data, data_input_size
    from rmtp.sources import SavedFolder

    folder = Path(source)
    saved = SavedFolder(text=str(folder), path=folder)  # only this kind: rmtp.load's refusals name the others
    model = saved.load().model
    spec = _saved_data(saved)
    if shape is None:
        shape = tuple(data_input_size(spec, model)) if spec is not None else _model_shape(model)
    if spec is None:
        return model, shape, None, f"{folder} has no recipe.yaml, so no data"
    return model, shape, build_data(spec, model).val if want_data else None, ""


def _model_shape(model: nn.Module) -> tuple[int, ...]:
    from rmtp.data import model_input_size

    return tuple(model_input_size(model))


def _shape(value: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ExportError(f"export input_shape must be (C, H, W), got {short_repr(value)}")
    return shape


def _saved_data(saved: Any) -> Any:
    """The DataSpec of the folder's saved recipe (:meth:`rmtp.sources.SavedFolder.data`), or None."""
    from rmtp.errors import RmtpError

    try:
        data = saved.data()
    except RmtpError as exc:
        raise ExportError(str(exc)) from None
    return None if data is None else data.spec


def _inputs(data: Dataset | None, no_data: str, shape: tuple[int, ...], batch: int, count: int
            ) -> tuple[list[Tensor], str]:
    """Batches of ``batch`` to compare on: the first val images (whole batches, at least one), or
    seeded random ones when there is no data; and how the report describes them."""
    batches = max(1, count // batch)
    if data is None:
        generator = torch.Generator().manual_seed(_SEED)
        inputs = [torch.randn(batch, *shape, generator=generator) for _ in range(batches)]
        why = f" ({no_data})" if no_data else ""
        return inputs, f"random normal inputs, seed {_SEED}{why}"
    if len(data) < batch:
        raise ExportError(f"export --check: the val split has {len(data)} images, fewer than one batch of {batch}")
    batches = min(batches, len(data) // batch)
    images = [data[i][0] for i in range(batches * batch)]
    inputs = [torch.stack(images[i * batch:(i + 1) * batch]) for i in range(batches)]
    if tuple(inputs[0].shape[1:]) != shape:
        raise ExportError(f"export --check: val images are {tuple(inputs[0].shape[1:])}, the export's input is {shape}")
    return inputs, "val images"


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode while it is exported (dropout off), as it was afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.train(mode)


