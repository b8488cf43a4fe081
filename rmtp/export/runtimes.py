"""Each format written to a temporary file and run back by its runtime, outputs compared with PyTorch's."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from rmtp.errors import short_repr
from rmtp.export.refusals import TOLERANCE, ExportError


def discrete_hint(model: nn.Module) -> str:
    """What to add to a failed comparison of a token-reduced model: which tokens it keeps or merges
    is decided by comparing scores, so where scores tie to within rounding (near-identical tokens,
    e.g. in an untrained model) another runtime's rounding can pick other tokens."""
    from rmtp.contract.saved_types import patches_of

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


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[None]:
    """timm attentions on their explicit path (``fused_attn`` off, restored after) while tracing for ONNX.

    The TorchScript exporter writes ``scaled_dot_product_attention`` as MatMul, Softmax, MatMul
    anyway, the ops of the explicit path, but it cannot trace every fused call: in timm's Eva
    attention (EVA-02, DINOv3) ``is_causal`` reaches the kernel as a tensor and the export fails
    ("argument 'is_causal' must be bool, not Tensor"). The outputs agree to float rounding, and the
    exported file is checked against the PyTorch model's outputs as always."""
    switched = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
    for module in switched:
        module.fused_attn = False
    try:
        yield
    finally:
        for module in switched:
            module.fused_attn = True


def onnx_writer(model: nn.Module, inputs: list[Tensor], expected: list[Tensor], opset: int, hint: str):
    def write(tmp: str) -> float:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), explicit_attention(model):
                # TracerWarnings and the legacy exporter's deprecation notice; the run below checks the graph
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (inputs[0],), tmp, dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=["logits"], do_constant_folding=True)
        except Exception as exc:
            raise ExportError(f"torch.onnx.export cannot export this model: {_first_line(exc)}") from exc
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            session = ort.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            outputs = [torch.from_numpy(session.run(None, {name: x.numpy()})[0]) for x in inputs]
        except Exception as exc:
            raise ExportError(f"onnxruntime cannot run the exported model: {_first_line(exc)}") from exc
        return _compare(outputs, expected, "onnxruntime", hint)

    return write


def pt2_writer(model: nn.Module, inputs: list[Tensor], expected: list[Tensor], hint: str):
    def write(tmp: str) -> float:
        try:
            program = torch.export.export(model, (inputs[0],))
        except Exception as exc:
            raise ExportError(f"torch.export cannot export this model: {_first_line(exc)}") from exc
        with open(tmp, "wb") as handle:  # a file object: torch.export warns about a name not ending .pt2
            torch.export.save(program, handle)
        try:
            with open(tmp, "rb") as handle:
                reloaded = torch.export.load(handle).module()
            outputs = [reloaded(x) for x in inputs]
        except Exception as exc:
            raise ExportError(f"the saved pt2 program does not reload and run: {_first_line(exc)}") from exc
        return _compare(outputs, expected, "reloaded pt2", hint)

    return write


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


