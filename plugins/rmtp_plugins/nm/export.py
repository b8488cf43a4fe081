"""Export of 2:4 Linear layers to PyTorch's semi-structured sparse tensors (CUDA only).

``torch.sparse.to_sparse_semi_structured`` stores a 2:4 weight compressed (half the values plus
metadata) and runs ``F.linear`` on the sparse tensor cores of Ampere and newer GPUs (cuSPARSELt,
or CUTLASS when cuSPARSELt is unavailable or forced). It needs: a CUDA tensor, fp16 or bf16 here
(what rmtp exports; int8/fp8 need quantisation rmtp does not do), at most 2 nonzeros in every group
of 4 consecutive inputs of a row, and both weight dimensions multiples of the backend's minimum
tile (fp16/bf16: 16×16 for cuSPARSELt, 32×64 for CUTLASS). Everything is checked before anything
is converted, and every refusal says which layer and why. Conversion is for inference: the
compressed weight is frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from rmtp.errors import DeviceError, RmtpError
from rmtp_plugins.nm.masks import check_nm

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
#: Oldest GPU generation with sparse tensor cores (Ampere, sm_80).
MIN_CAPABILITY = (8, 0)


@dataclass
class SemiStructuredReport:
    """What :func:`to_semi_structured` converted, and what it left dense with the reason."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    backend: str = ""


def _backend() -> tuple[str, dict]:
    """(name, dtype → shape constraints) of the backend ``to_sparse_semi_structured`` will use."""
    from torch.sparse import (
        SparseSemiStructuredTensor,
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    cusparselt = getattr(torch.backends, "cusparselt", None)
    use_cutlass = SparseSemiStructuredTensor._FORCE_CUTLASS or cusparselt is None or not cusparselt.is_available()
    cls = SparseSemiStructuredTensorCUTLASS if use_cutlass else SparseSemiStructuredTensorCUSPARSELT
    return cls.BACKEND, cls._DTYPE_SHAPE_CONSTRAINTS


def semi_structured_problem(layer: nn.Module, *, constraints: dict | None = None,
                            require_cuda: bool = True) -> str | None:
    """Why ``layer`` cannot become a semi-structured 2:4 Linear (``None`` if it can).

    ``constraints`` maps dtype → (min_rows, min_cols, …) as torch's backends declare them (default:
    the backend that would be used). ``require_cuda=False`` skips the device check (for tests).
    """
    if not isinstance(layer, nn.Linear):
        return f"{type(layer).__name__} is not an nn.Linear (only Linear layers are exported)"
    weight = layer.weight
    if require_cuda and weight.device.type != "cuda":
        return f"weight is on {weight.device}; move the model to a CUDA device first (model.cuda())"
    if weight.dtype not in SUPPORTED_DTYPES:
        return (f"weight dtype is {str(weight.dtype).replace('torch.', '')}; semi-structured export needs "
                f"float16 or bfloat16 (model.half() or model.to(torch.bfloat16))")
    rows, cols = weight.shape
    if cols % 4:
        return f"in_features={cols} is not a multiple of 4"
    check = check_nm(weight, 2, 4)
    if not check.ok:
        return (f"not 2:4: {check.bad_groups} of {check.groups} groups of 4 hold more than 2 nonzeros "
                f"(up to {check.max_nonzeros}); prune it with n:m n=2, m=4")
    limits = constraints.get(weight.dtype) if constraints is not None else None
    if limits is not None:
        min_rows, min_cols = limits[0], limits[1]
        if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
            return (f"shape {rows}×{cols} is not supported: both dimensions must be multiples of "
                    f"{min_rows}×{min_cols} for {str(weight.dtype).replace('torch.', '')}")
    return None


def _require_gpu() -> None:
    if not torch.cuda.is_available():
        raise DeviceError(
            "to_semi_structured: 2:4 semi-structured kernels need a CUDA GPU (Ampere or newer) and torch "
            "sees none on this machine; on the CPU the N:M masks are exact zeros (count them with "
            "rmtp_plugins.nm.check_nm or the report's nonzeros) but run at dense speed")
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        raise DeviceError(
            f"to_semi_structured: the GPU has compute capability {capability[0]}.{capability[1]}; sparse "
            f"tensor cores need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ampere) or newer")


def to_semi_structured(model: nn.Module, layers: Iterable[str] | None = None) -> SemiStructuredReport:
    """Replace the weights of 2:4 Linear layers by ``torch.sparse`` semi-structured tensors, in place.

    ``layers``: names of the Linear modules to convert; every one must qualify, else nothing is
    converted and :class:`~rmtp.errors.RmtpError` lists each problem. Default: every Linear whose
    weight is 2:4 and has zeros (a layer an N:M step pruned); the others are listed in
    ``skipped`` with the reason, and if none qualifies the call fails with those reasons.

    Raises :class:`~rmtp.errors.DeviceError` without a CUDA GPU with sparse tensor cores.
    """
    _require_gpu()
    from torch.sparse import to_sparse_semi_structured

    backend, constraints = _backend()
    report = SemiStructuredReport(backend=backend)
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if layers is not None:
        wanted = list(layers)
        unknown = [name for name in wanted if name not in linears]
        problems = {name: "no nn.Linear of that name in the model" for name in unknown}
        problems.update({name: p for name in wanted if name in linears
                         and (p := semi_structured_problem(linears[name], constraints=constraints))})
        if problems:
            raise RmtpError("to_semi_structured: cannot convert " + "; ".join(f"{k}: {v}" for k, v in problems.items()))
        targets = wanted
    else:
        targets = []
        for name, module in linears.items():
            if bool((module.weight == 0).any()):
                problem = semi_structured_problem(module, constraints=constraints)
                if problem is None:
                    targets.append(name)
                else:
                    report.skipped[name] = problem
            else:
                report.skipped[name] = "dense (no zeros): not an N:M layer"
        if not targets:
            reasons = "; ".join(f"{k}: {v}" for k, v in report.skipped.items() if not v.startswith("dense"))
            raise RmtpError("to_semi_structured: no Linear layer of the model can be exported"
                            + (f" ({reasons})" if reasons else " (no layer holds an N:M mask)"))
    for name in targets:
        _convert(linears[name], to_sparse_semi_structured)
        report.converted.append(name)
    return report


def _convert(module: nn.Linear, to_sparse_semi_structured: Callable[[torch.Tensor], torch.Tensor]) -> None:
    module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach().contiguous()), requires_grad=False)


#: The label :func:`semi_structured_kernel` returns for a converted layer.
KERNEL_LABEL = "2:4 semi-structured"


def semi_structured_kernel(module: nn.Module, *, device: torch.device, dtype: torch.dtype) -> str | None:
    """``rmtp bench``'s kernel protocol (``rmtp_kernel(device=, dtype=)``) for one plain Linear:
    convert it in place and return :data:`KERNEL_LABEL` when it holds a 2:4 mask and the GPU, dtype
    and shape allow; otherwise leave it dense and return ``None`` (never raises for an unsuitable
    layer or machine)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    if torch.cuda.get_device_capability() < MIN_CAPABILITY or dtype not in SUPPORTED_DTYPES:
        return None
    if not isinstance(module, nn.Linear) or not bool((module.weight == 0).any()):
        return None
    if semi_structured_problem(module, constraints=_backend()[1]) is not None:
        return None
    from torch.sparse import to_sparse_semi_structured

    _convert(module, to_sparse_semi_structured)
    return KERNEL_LABEL
