"""``Int8Linear``: a Linear layer stored as int8 weights with one scale per output channel, run by
PyTorch's dynamic-quantization kernel on CPU.

The weights are quantized once, symmetrically per output row (scale = max|row| / 127.5, zero point
0, values clamped to [-128, 127]), exactly as PyTorch's ``per_channel_dynamic_qconfig`` does; the
activations are quantized per call, per tensor, by the kernel itself (``reduce_range=True``, as
``torch.ao.nn.quantized.dynamic.Linear`` calls it). On a CPU with a quantized engine (fbgemm/x86
on Intel and AMD, qnnpack on ARM) the layer is that kernel: ``tests/test_int8.py`` checks it
against ``torch.ao.nn.quantized.dynamic.Linear`` bit for bit.

Why our own module instead of PyTorch's: what a folder saves is then plain tensors (``weight``
int8, ``scale`` float32, ``bias``) under a stable id, not PyTorch's packed-params object, whose
serialisation belongs to the deprecated eager-mode quantization API. Anywhere the kernel cannot
run (a CUDA or MPS tensor, a torch built without a quantized engine) the layer computes with its
kernel's arithmetic in float ops instead (:meth:`Int8Linear.emulated`: same numbers up to
summation order, no speed-up), so a model screened or scored on a GPU is the one the CPU runs.
The layer cannot be trained: its int8 weights have no gradient, and the kernel none for its input
either, so a backward pass through it is refused.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rmtp.contract.saved_types import rebuildable

#: The int8 range the weights use (PyTorch's qint8 observer: quant_min, quant_max).
QMIN, QMAX = -128, 127


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row) of ``weight``, symmetric per output row, as PyTorch's
    ``PerChannelMinMaxObserver(qscheme=per_channel_symmetric)`` and ``quantize_per_channel``
    compute them: scale = max(|row|) / 127.5 (at least float32's eps), q = clamp(round(w / scale))."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = torch.clamp(absmax / ((QMAX - QMIN) / 2), min=torch.finfo(torch.float32).eps)
    with _quantized_tensors_allowed():
        q = torch.quantize_per_channel(w, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    return q.int_repr(), scale


@contextmanager
def _quantized_tensors_allowed() -> Iterator[None]:
    """PyTorch warns that creating qint8 tensors is deprecated (the eager quantization API moves to
    torchao). rmtp creates them only inside this module, to hand its own int8 tensors to the
    kernel, and saves none, so the warning tells a user nothing they can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        yield


@rebuildable("int8.linear")
class Int8Linear(nn.Module):
    """``Linear(in → out)`` with int8 weights (``weight``, a frozen int8 parameter so that counts
    and saving see it), float32 ``scale`` per output row and a float ``bias``."""

    #: Why ``rmtp export`` refuses a model with these layers (read by :func:`rmtp.export.refusals.export_problems`).
    export_refusal = ("int8 layers run PyTorch's own CPU int8 kernel, which neither ONNX nor torch.export can "
                      "write; export the model saved before its int8 step and quantize in the runtime")

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._packed: tuple[tuple[Any, ...], Any] | None = None  # (what it was packed from, packed weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """``linear``'s weights quantized per output row (bias kept in float)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        values, scale = quantize_rows(linear.weight)
        layer.weight.data.copy_(values)
        layer.scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the int8 values stand for (``q · scale`` per row)."""
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)  # the kernel takes 2-D input (and 1-D is a Linear's too)
        if _kernel_runs_on(x):
            out = _NoGradient.apply(rows.float(), self._packed_weight())
        else:
            out = _NoGradient.apply(rows.float(), self)
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def emulated(self, rows: torch.Tensor) -> torch.Tensor:
        """What the CPU kernel computes, in plain float ops, for devices it does not run on: the
        input quantized per tensor to 7 bits as the kernel does (``reduce_range``: range including
        0, 127 steps, zero point rounded into range), times the dequantized weights. It matches
        the kernel up to summation order (tests/test_int8.py), so a GPU screens and scores the
        model the CPU will run; it is not faster than float."""
        low = torch.clamp(rows.min(), max=0)
        high = torch.clamp(rows.max(), min=0)
        step = ((high - low).double() / _ACTIVATION_STEPS).float()
        step = torch.where(step > 0, step, torch.full_like(step, 0.1))  # the kernel's choice for a zero range
        zero = torch.clamp(torch.round(-low / step), 0, _ACTIVATION_STEPS)
        levels = torch.clamp(torch.round(rows / step) + zero, 0, _ACTIVATION_STEPS)
        bias = None if self.bias is None else self.bias.float()
        return F.linear((levels - zero) * step, self.dequantized_weight(), bias)

    def _packed_weight(self) -> Any:
        """The kernel's packed weight, packed on first use and again after anything that may have
        changed ``weight``, ``scale`` or ``bias``: a load, a move or cast (both clear it), an
        in-place edit through autograd (the tensors' version counters)."""
        tensors = [self.weight, self.scale] + ([self.bias] if self.bias is not None else [])
        key = tuple((id(t), t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors)
        if self._packed is None or self._packed[0] != key:
            bias = None if self.bias is None else self.bias.detach().float()
            with _quantized_tensors_allowed():
                qweight = torch._make_per_channel_quantized_tensor(
                    self.weight.detach(), self.scale.detach().double(),
                    torch.zeros_like(self.scale, dtype=torch.long), 0)
                self._packed = (key, torch.ops.quantized.linear_prepack(qweight, bias))
        return self._packed[1]

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()``: repack from the moved tensors, and keep ``scale`` in
        float32: a model-wide ``.half()`` or ``.to(torch.bfloat16)`` would otherwise round every
        row's step (fp16 keeps 11 bits of it), and the kernel takes float32 scales anyway."""
        self._packed = None
        scale = self.scale
        result = super()._apply(fn, recurse)
        if self.scale.dtype != torch.float32:
            self.scale = scale.to(device=self.scale.device)
        return result

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # The packed weight is a TorchScript object that neither copies nor pickles; it is rebuilt
        # from the tensors on first use.
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def rmtp_kernel(self, device: torch.device, dtype: torch.dtype) -> str:
        """``rmtp bench``'s kernel column: which of the two ways this layer will compute there."""
        engine = quantized_engine()
        if torch.device(device).type == "cpu" and engine is not None:
            return f"int8 ({engine})"
        return "int8 emulated in float (no int8 kernel here)"

    def rmtp_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel weights"


#: Activation levels of the kernel's 7-bit input quantization (quint8 with ``reduce_range``: 0..127).
_ACTIVATION_STEPS = 127


class _NoGradient(torch.autograd.Function):
    """The int8 product as an autograd node whose backward refuses: the forward runs everywhere
    (inference with upstream parameters that require grad, saliency maps of the float layers
    after it), and a training step through it fails at ``backward`` with what to do, instead of
    training nothing upstream in silence."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, weight: Any) -> torch.Tensor:
        if isinstance(weight, Int8Linear):
            return weight.emulated(rows)
        return torch.ops.quantized.linear_dynamic(rows, weight, reduce_range=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        raise RuntimeError("an int8 layer passes no gradient, so nothing before it can train: put the int8 "
                           "step after every finetune, distill or reconstruct step")


def _kernel_runs_on(x: torch.Tensor) -> bool:
    """Whether PyTorch's dynamic int8 kernel takes ``x``: a CPU tensor, with a quantized engine."""
    return x.device.type == "cpu" and quantized_engine() is not None


def quantized_engine() -> str | None:
    """The quantized engine PyTorch runs int8 kernels with here (None: none is built in, or this
    torch no longer has the dynamic int8 Linear kernel)."""
    engine = torch.backends.quantized.engine
    if not _has_dynamic_kernel():
        return None
    return engine if engine and engine != "none" else None


@functools.cache
def _has_dynamic_kernel() -> bool:
    """Whether this torch has the dynamic int8 Linear op: asked once per process, not per forward."""
    try:
        torch.ops.quantized.linear_dynamic  # noqa: B018 - raises where the op is gone
    except (AttributeError, RuntimeError):
        return False
    return True


__all__ = ["Int8Linear", "quantize_rows", "quantized_engine"]
