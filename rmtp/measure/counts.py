"""Size and compute of a model: parameters, nonzeros and multiply-accumulates (MACs).

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode`, which counts only matrix
products: ``mm``/``addmm`` (linear layers, bias ignored), ``bmm``/``baddbmm``, convolutions
(bias ignored) and the fused attention kernels. Norms, activations, softmax, residual adds and
pooling count zero. Two gaps in PyTorch's own registry are filled here, so that a model's MACs
do not depend on which kernel happened to run:

* ``F.scaled_dot_product_attention`` on CPU dispatches to
  ``aten._scaled_dot_product_flash_attention_for_cpu``, which PyTorch does not count (its
  registry has only the CUDA flash, efficient and cuDNN kernels), so timm ViTs with fused
  attention came out with zero attention MACs. It is given the same formula PyTorch uses for
  the CUDA kernels (``sdpa_flop_count``: QKᵀ plus AV), as is the XPU/PrivateUse1
  ``_scaled_dot_product_fused_attention_overrideable`` kernel (:data:`FLOP_FORMULAS`).
* ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take a fused C++ fast path
  under ``no_grad``/``inference_mode`` that nothing counts (the whole layer reads zero). The
  fast path is switched off while counting, so their projections and attention are counted
  through the ordinary ops.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from rmtp.measure.running import batch_of_one, check_model_on, evaluating, input_dtype
from rmtp.run.device import DeviceLike, resolve_device

__all__ = [
    "ATTENTION",
    "FLOP_FORMULAS",
    "count_macs",
    "count_nonzeros",
    "count_params",
    "counted_forward",
    "mac_breakdown",
    "model_summary",
    "storage_key",
    "unique_parameters",
]

#: Key of :func:`mac_breakdown` that gathers the attention matmuls (QKᵀ and AV).
ATTENTION = "attention"

_aten = torch.ops.aten


# --------------------------------------------------------------------------- parameters


def storage_key(p: torch.Tensor) -> tuple[Any, ...]:
    """Identity of the memory a parameter occupies, so two Parameter objects over the same
    storage (weights tied by sharing ``.data``) count once. Falls back to object identity
    where there is no real storage (meta tensors, empty tensors, exotic subclasses)."""
    if p.device.type == "meta" or p.numel() == 0:
        return ("id", id(p))
    try:
        ptr = p.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return ("id", id(p))
    return ("storage", p.device, ptr, p.storage_offset(), tuple(p.shape), tuple(p.stride()), p.dtype)


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter tensor once: ``parameters()`` already drops repeats of the same
    Parameter object (``b.weight = a.weight``); this also drops distinct Parameters that are
    views of the same memory."""
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for p in model.parameters():
        key = storage_key(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def count_params(model: nn.Module) -> int:
    """Physical parameter count: tied weights (one tensor reachable from several modules)
    count once, because they cost memory once. A low-rank pair counts both of its factors."""
    return sum(p.numel() for p in unique_parameters(model))


@torch.no_grad()
def count_nonzeros(model: nn.Module) -> int:
    """Nonzero entries over the same unique parameters as :func:`count_params`: what a mask
    pruner's sparsity actually removes (its zeroed weights are still parameters)."""
    return sum(int(torch.count_nonzero(p)) for p in unique_parameters(model))


@contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """Route nn.MultiheadAttention / nn.TransformerEncoderLayer through ordinary ops, whose
    FLOPs are counted, instead of their uncounted fused kernels (same numbers out)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


@contextmanager
def _parameters_frozen(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter of ``model`` for the count, then restore each.

    FlopCounterMode's module tracker hooks the autograd graph of every module input that requires
    grad, which fails under inference mode when the input is a parameter itself (timm's attention
    pooling head feeds its learned ``latent`` query to a Linear: the Perception Encoder): a count
    needs no gradients."""
    wanted = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in wanted:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in wanted:
            p.requires_grad_(flag)


# --------------------------------------------------------------------------- MACs


def _sdpa_forward_flops(query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None,
                        **kwargs: Any) -> int:
    """FLOPs of a fused attention forward: 2·B·H·Sq·Sk·(D + Dv), torch's own formula."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args: Any,
                         out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of a fused attention backward, torch's own formula (for counting training steps)."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _missing_attention_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas for the SDPA kernels PyTorch's flop registry leaves out (looked up by name, so
    an older torch without one of these ops still works)."""
    forward = ["_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_fused_attention_overrideable",
               "_scaled_dot_product_attention_math_for_mps"]
    backward = ["_scaled_dot_product_flash_attention_for_cpu_backward",
                "_scaled_dot_product_fused_attention_overrideable_backward"]
    mapping: dict[Any, Callable[..., int]] = {}
    for names, formula in ((forward, _sdpa_forward_flops), (backward, _sdpa_backward_flops)):
        for name in names:
            op = getattr(_aten, name, None)
            if op is not None:
                mapping[op] = formula
    quantized = getattr(torch.ops, "quantized", None)
    try:  # int8's layers (rmtp_plugins.int8): PyTorch's dynamic int8 Linear kernel, where this torch has it
        mapping[quantized.linear_dynamic] = _int8_linear_flops  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):
        pass
    return mapping


def _int8_linear_flops(input_shape, packed_weight, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of the dynamic int8 Linear kernel: 2·rows·in·out, as for the float Linear it replaces
    (int8 changes how fast a multiply-add runs, not how many there are)."""
    rows = 1
    for size in input_shape[:-1]:
        rows *= size
    return 2 * rows * input_shape[-1] * out_shape[-1]


#: FlopCounterMode ``custom_mapping`` for the SDPA kernels PyTorch's flop registry leaves out (CPU fused
#: attention among them) and for the int8 Linear kernel; anything counting FLOPs the way rmtp does passes it.
FLOP_FORMULAS = _missing_attention_formulas()

#: Ops whose FLOPs are attention, i.e. products of two activations (QKᵀ and AV), as opposed
#: to an activation times a weight. Linear layers reach FlopCounterMode as mm/addmm whatever
#: the input rank (matmul folds the leading dims), so in timm vision models the batched
#: matmuls bmm/baddbmm come only from attention written out explicitly (``fused_attn=False``,
#: or SDPA's math fallback); counting them here keeps the breakdown the same on every path.
_ATTENTION_OP_NAMES = frozenset({
    "bmm", "baddbmm",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable", "_scaled_dot_product_attention_math_for_mps",
    "_flash_attention_forward", "_efficient_attention_forward", "flex_attention",
    "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_cudnn_attention_backward", "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_fused_attention_overrideable_backward", "_flash_attention_backward",
    "_efficient_attention_backward", "flex_attention_backward",
})


def _op_key(op: Any) -> str:
    """Breakdown key of one counted op: ``attention`` for the attention kernels, else the op's
    name as torch prints it (``aten.addmm``, ``aten.convolution``, ...)."""
    name = getattr(op, "__name__", None) or str(op)
    short = name.rsplit(".", 1)[-1]
    return ATTENTION if short in _ATTENTION_OP_NAMES else str(op)


def counted_forward(model: nn.Module, x: torch.Tensor) -> FlopCounterMode:
    """One forward pass of ``model`` on ``x`` under FlopCounterMode with :data:`FLOP_FORMULAS`, in
    eval mode (restored after), without autograd, ``nn.MultiheadAttention`` on ordinary ops: the
    one way rmtp counts FLOPs. Returns the counter (totals under ``"Global"``, then per module)."""
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with evaluating(model), _parameters_frozen(model), _mha_fastpath_disabled(), torch.inference_mode(), counter:
        model(x)
    return counter


def mac_breakdown(model: nn.Module, input_shape: tuple[int, ...], *,
                  device: DeviceLike = "cpu") -> dict[str, int]:
    """Multiply-accumulates of one forward pass on a batch of one, per kind of op.

    ``input_shape`` is the per-sample shape without the batch dimension (what
    :func:`rmtp.data.model_input_size` returns). Keys are torch op names (``aten.addmm`` for
    linear layers with bias, ``aten.mm`` without, ``aten.convolution``) plus
    :data:`ATTENTION` for QKᵀ and AV, however they were computed, so reports can show
    attention apart from the weight layers whose size pruning changes. MACs are FLOPs / 2
    (FlopCounterMode counts 2 FLOPs per multiply-add and ignores biases). Sorted largest first.
    """
    dev = resolve_device(device)
    check_model_on(model, dev)
    counter = counted_forward(model, torch.randn(batch_of_one(input_shape), device=dev, dtype=input_dtype(model)))
    flops: dict[str, int] = defaultdict(int)
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        flops[_op_key(op)] += int(n)
    return {k: v // 2 for k, v in sorted(flops.items(), key=lambda kv: -kv[1]) if v}


def count_macs(model: nn.Module, input_shape: tuple[int, ...], *, device: DeviceLike = "cpu") -> int:
    """Multiply-accumulates of one forward pass on a batch of one (see :func:`mac_breakdown`
    for what is counted). The model must already be on ``device``."""
    return sum(mac_breakdown(model, input_shape, device=device).values())


def model_summary(model: nn.Module, input_shape: tuple[int, ...], *,
                  device: DeviceLike = "cpu") -> dict[str, int]:
    """The size and compute figures a report puts side by side for dense and pruned models:
    ``params``, ``nonzeros``, ``macs`` (batch of one) and the ``attention_macs`` part of them,
    which weight pruning does not touch and token pruning does."""
    breakdown = mac_breakdown(model, input_shape, device=device)
    return {
        "params": count_params(model),
        "nonzeros": count_nonzeros(model),
        "macs": sum(breakdown.values()),
        "attention_macs": breakdown.get(ATTENTION, 0),
    }
