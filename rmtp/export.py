"""Export a model (an rmtp output folder, or an ``nn.Module``) to a file a runtime executes.

:func:`export_model` writes one of two formats, each verified before it is put in place:

``onnx``
    ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``), then loaded and run in
    ``onnxruntime.InferenceSession(providers=["CPUExecutionProvider"])``. Why not the newer
    ``torch.export``-based exporter (``dynamo=True``, the default since torch 2.9): with torch
    2.14 both export every rmtp pruner's output once the token code avoids ``sort(stable=True)``,
    but the TorchScript exporter does it 4-10x faster (a timm ViT-Ti at 224: 2 s vs 8.5 s), needs no
    ``onnxscript``, and its graphs run as fast or faster in ONNX Runtime (ResNet-18 on 2 cores:
    16 ms vs 27 ms; ViT-Ti 24 ms either way). torch marks it deprecated; rmtp pins torch to
    <= 2.14.1, where it is there.
``pt2``
    ``torch.export.export(model, (example,))`` and ``torch.export.save``; verified by
    ``torch.export.load(...).module()`` on the same inputs.

Graphs are static: one batch size (``batch``) and one input shape, which is what lets token
reduction (a fixed number of tokens per block) export at all. Verification compares the file's
outputs with the PyTorch model's: on one seeded random batch, or with ``check=True`` on
``check_images`` real val images of the folder's dataset (from its saved ``recipe.yaml``). A
maximum absolute difference above :data:`TOLERANCE` (fp32) fails the export.

What no exporter can write is refused before anything is written, with the reason: ``torch.sparse``
tensors (the 2:4 semi-structured weights ``rmtp_plugins.nm.to_semi_structured`` makes run only on
CUDA sparse tensor cores), weights off the CPU, weights that are not float32, and ONNX files over
protobuf's 2 GB (which would need external data files beside the ``.onnx``; pt2 has no such limit).

The file is written under a temporary name in the target folder and renamed into place only once
verified (:func:`rmtp.atomic.replace_atomically`): a failed export or verification leaves any
previous file as it was and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from rmtp.atomic import check_writable, replace_atomically, write_errors
from rmtp.errors import RmtpError, short_repr

if TYPE_CHECKING:
    from torch.utils.data import Dataset

__all__ = ["FORMATS", "TOLERANCE", "ExportError", "ExportReport", "export_model", "export_problems"]

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
_SEED = 0


class ExportError(RmtpError):
    """A model could not be exported, or its exported file does not compute what the model does."""


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
                 format: Format,  # noqa: A002 - the CLI's --format
                 batch: int = 1, check: bool = False, check_images: int = 32, opset: int | None = None,
                 input_shape: Sequence[int] | None = None) -> ExportReport:
    """Write ``source`` to ``path`` as ``format`` (``"onnx"`` or ``"pt2"``), verified, atomically.

    ``source``: an rmtp output folder (loaded with :func:`rmtp.load`; its input shape is what its
    saved recipe's data gives the model, else :func:`rmtp.data.model_input_size`) or an
    ``nn.Module`` with ``input_shape`` ``(C, H, W)``. ``input_shape`` also overrides a folder's.
    ``batch``: the exported graph's (static) batch size. ``check``: compare outputs on
    ``check_images`` val images of the folder's dataset, in batches of ``batch`` (random inputs,
    said so in the report, when there is no data: an ``nn.Module``, a folder without a recipe).
    ``opset``: ONNX opset (default 17). Raises :class:`ExportError` (one line) on a refusal, a
    failed export or a difference above :data:`TOLERANCE`.
    """
    started = time.perf_counter()
    fmt = _check_options(format, batch, check_images, opset)
    path = Path(path)
    check_writable(path, what="export", is_dir=False)
    model, shape, data, no_data = _source(source, input_shape, want_data=check)
    problems = export_problems(model, fmt)
    if problems:
        raise ExportError(f"cannot export {_name(source)} to {fmt}: " + "; ".join(problems))
    inputs, described = _inputs(data, no_data, shape, batch, check_images if check else batch)
    with _eval_mode(model), torch.no_grad():
        expected = [model(x) for x in inputs]
        for out in expected:
            if not isinstance(out, Tensor):
                raise ExportError(f"cannot export {_name(source)}: its forward returns {type(out).__name__}, "
                                  f"not one tensor")
        opset_used = opset or DEFAULT_OPSET
        hint = _discrete_hint(model)
        writer = (_onnx_writer(model, inputs, expected, opset_used, hint) if fmt == "onnx"
                  else _pt2_writer(model, inputs, expected, hint))
        result: dict[str, float] = {}
        with write_errors("export", path, consequence="nothing was written"):
            replace_atomically(path, lambda tmp: result.update(diff=writer(tmp)))
    exporter = (f"torch.onnx.export (TorchScript, opset {opset_used}) + onnxruntime {_ort_version()}"
                if fmt == "onnx" else f"torch.export (torch {torch.__version__.split('+')[0]})")
    return ExportReport(path=path, format=fmt, bytes=path.stat().st_size, input_shape=tuple(shape), batch=batch,
                        max_abs_diff=result["diff"], images=len(inputs) * batch, inputs=described,
                        exporter=exporter, seconds=round(time.perf_counter() - started, 3))


def export_problems(model: nn.Module, format: str = "onnx") -> list[str]:  # noqa: A002
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


# ----------------------------------------------------------------------------------- the source


def _check_options(fmt: object, batch: object, check_images: object, opset: object) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"export format {short_repr(fmt)}: choose one of {', '.join(FORMATS)}")
    for name, value, low in (("batch", batch, 1), ("check_images", check_images, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ExportError(f"export {name} must be a whole number >= {low}, got {short_repr(value)}")
    if opset is not None:
        if fmt != "onnx":
            raise ExportError("export opset is for --format onnx only")
        if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
            raise ExportError(f"export opset must be {MIN_OPSET}..{MAX_OPSET}, got {short_repr(opset)}")
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ExportError(f"ONNX export is checked in onnxruntime, which is not installed: {INSTALL_HINT}") from None
    return str(fmt)


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
    from rmtp.saving import load

    folder = Path(source)
    loaded = load(folder)
    spec = _saved_data(folder)
    if shape is None:
        shape = tuple(data_input_size(spec, loaded.model)) if spec is not None else _model_shape(loaded.model)
    if spec is None:
        return loaded.model, shape, None, f"{folder} has no recipe.yaml, so no data"
    return loaded.model, shape, build_data(spec, loaded.model).val if want_data else None, ""


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


def _saved_data(folder: Path) -> Any:
    """The DataSpec of the folder's saved recipe, or None when it has none."""
    from pydantic import ValidationError

    from rmtp.data import DataSpec, saved_split_seed
    from rmtp.saving import RECIPE_FILE, read_saved_recipe

    recipe = read_saved_recipe(folder)
    if recipe is None:
        return None
    try:
        return DataSpec(**{**(recipe.get("data") or {}), "split_seed": saved_split_seed(recipe)})
    except (ValidationError, TypeError) as exc:
        raise ExportError(f"{folder / RECIPE_FILE}: data: not a valid data section: {short_repr(str(exc), 200)}") from None


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


# ------------------------------------------------------------------------------------- writers


def _discrete_hint(model: nn.Module) -> str:
    """What to add to a failed comparison of a token-reduced model: which tokens it keeps or merges
    is decided by comparing scores, so where scores tie to within rounding (near-identical tokens,
    e.g. in an untrained model) another runtime's rounding can pick other tokens."""
    from rmtp.modules import patches_of

    if not patches_of(model):
        return ""
    return (" (the model reduces tokens by comparing scores: where they tie to within float rounding, as in "
            "an untrained model with near-identical tokens, the runtime's rounding picks other tokens)")


def _compare(outputs: list[Tensor], expected: list[Tensor], what: str, hint: str = "") -> float:
    diff = 0.0
    for out, ref in zip(outputs, expected):
        if tuple(out.shape) != tuple(ref.shape):
            raise ExportError(f"{what}: output shape {tuple(out.shape)} differs from PyTorch's {tuple(ref.shape)}")
        diff = max(diff, float((out.float() - ref.float()).abs().max()))
    if not diff <= TOLERANCE:  # also NaN
        raise ExportError(f"{what}: max |difference| from the PyTorch model is {diff:.3g} > {TOLERANCE:g} (fp32); "
                          f"nothing was written{hint}")
    return diff


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return short_repr(f"{type(exc).__name__}: {text[0] if text else ''}", 300)


def _onnx_writer(model: nn.Module, inputs: list[Tensor], expected: list[Tensor], opset: int, hint: str):
    def write(tmp: str) -> float:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                # TracerWarnings and the legacy exporter's deprecation notice; the run below checks the graph
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (inputs[0],), tmp, dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=["logits"], do_constant_folding=True)
        except Exception as exc:  # noqa: BLE001 - any exporter failure is this model's refusal
            raise ExportError(f"torch.onnx.export cannot export this model: {_first_line(exc)}") from exc
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            session = ort.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            outputs = [torch.from_numpy(session.run(None, {name: x.numpy()})[0]) for x in inputs]
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors (a missing kernel, a bad graph)
            raise ExportError(f"onnxruntime cannot run the exported model: {_first_line(exc)}") from exc
        return _compare(outputs, expected, "onnxruntime", hint)

    return write


def _pt2_writer(model: nn.Module, inputs: list[Tensor], expected: list[Tensor], hint: str):
    def write(tmp: str) -> float:
        try:
            program = torch.export.export(model, (inputs[0],))
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"torch.export cannot export this model: {_first_line(exc)}") from exc
        with open(tmp, "wb") as handle:  # a file object: torch.export warns about a name not ending .pt2
            torch.export.save(program, handle)
        try:
            with open(tmp, "rb") as handle:
                reloaded = torch.export.load(handle).module()
            outputs = [reloaded(x) for x in inputs]
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"the saved pt2 program does not reload and run: {_first_line(exc)}") from exc
        return _compare(outputs, expected, "reloaded pt2", hint)

    return write


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
