"""Per-layer spectral analysis of a model, through its architecture adapter.

:func:`analyze_model` takes each prunable layer the adapter names (``vit``'s fused ``attn.qkv``
split into its q, k and v blocks), computes the singular values of its weight matrix and fits the
Marchenko–Pastur law to them (:func:`rmtp.spectral.mp.fit_mp`). Layers that cannot be analysed
are listed too, each with the reason: too small for statistics, a grouped or depthwise
convolution (one small filter per group, not one matrix), a layer a pruner has replaced, a
module without a weight matrix, non-finite weights. Nothing is left out silently.
:func:`analyze_state_dict` does the same for bare weights with no architecture, by key.

SVDs (``torch.linalg.svdvals``) run in float32 (float64 weights stay float64): the weights are
float32, LAPACK's float32 SVD is about twice as fast as float64, and its error, ~1e-7 of the
largest singular value, is far below the fit's own statistical precision (~1/min(M, N)).
Half-precision weights are upcast to float32. On the CPU the SVDs of different matrices run in
parallel, each single-threaded (see :func:`analyze_model`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from rmtp.contract.architecture import Architecture, PrunableLayer
from rmtp.contract.saved_types import is_replacement
from rmtp.errors import RmtpError
from rmtp.run.progress import NULL_PROGRESS, Progress
from rmtp.spectral.mp import MPFit, check_alpha, check_tw_confidence, fit_mp, weight_matrix

#: Default smallest min(M, N) analysed: below it an empirical spectrum is too coarse to fit.
MIN_DIM = 32


@dataclass(frozen=True)
class LayerSpectrum:
    """One analysed (or skipped) weight matrix.

    ``name`` is the module name, with ``[q]``/``[k]``/``[v]`` appended for a block of a fused qkv
    projection; ``rows`` are that block's output rows in the module's weight. ``shape`` is the
    (M, N) matrix analysed (a conv's ``out × in·kh·kw``), ``None`` when there is no such matrix.
    Exactly one of ``fit`` and ``skipped`` is set.
    """

    name: str
    module: str
    role: str
    weight_shape: tuple[int, ...]
    shape: tuple[int, int] | None
    fit: MPFit | None = None
    skipped: str | None = None
    optional: bool = False
    rows: tuple[int, int] | None = None
    module_params: int = 0
    singular_values: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def params(self) -> int:
        """Weights of this row (biases excluded): M·N for a matrix, else what the module holds."""
        if self.shape is not None:
            return self.shape[0] * self.shape[1]
        return self.module_params

    @property
    def params_kept_by_split(self) -> int:
        """Weights a rank-k split ``W ~ A(M×k) · B(k×N)`` keeps: k·(M+N) when that is fewer than M·N, else M·N.

        A skipped matrix is kept whole.
        """
        if self.fit is None or self.shape is None:
            return self.params
        split = self.fit.rank * (self.shape[0] + self.shape[1])
        return min(split, self.params)

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "name": self.name, "module": self.module, "role": self.role, "optional": self.optional,
            "rows": list(self.rows) if self.rows else None,
            "weight_shape": list(self.weight_shape), "shape": list(self.shape) if self.shape else None,
            "params": self.params, "params_kept_by_split": self.params_kept_by_split,
            "skipped": self.skipped,
        }
        fit = self.fit.to_dict() if self.fit is not None else {}
        fit.pop("shape", None)
        row["fit"] = fit or None
        return row


def _skip(name: str, role: str, module: nn.Module, reason: str, *, optional: bool = False) -> LayerSpectrum:
    weight = getattr(module, "weight", None)
    weight_shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()
    held = sum(p.numel() for key, p in module.named_parameters() if not key.rsplit(".", 1)[-1].startswith("bias"))
    return LayerSpectrum(name=name, module=name, role=role, weight_shape=weight_shape, shape=None,
                         skipped=reason, optional=optional, module_params=held)


def _why_not_a_matrix(module: nn.Module) -> str | None:
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"{kind} conv (groups={module.groups}): one small filter per group, not one weight matrix"
    weight = getattr(module, "weight", None)
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(weight, torch.Tensor) \
            and weight.ndim >= 2:
        return None
    if is_replacement(module):
        rank, shape = getattr(module, "rank", None), getattr(module, "effective_shape", None)
        what = ", ".join(filter(None, [f"rank {rank}" if isinstance(rank, int) else None,
                                       "×".join(map(str, shape)) if isinstance(shape, tuple) else None]))
        return (f"replaced by {type(module).__name__}{f' ({what})' if what else ''}: already pruned, not one "
                f"dense matrix; analyse the dense model")
    if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
        return f"not a matrix layer ({type(module).__name__} has no 2-D weight)"
    return None


def _targets(model: nn.Module, arch: Architecture,
             layers: Iterable[PrunableLayer | str] | None) -> list[tuple[str, str, bool]]:
    """(name, role, optional) of the modules to list, in forward (``named_modules``) order."""
    listed = {layer.name: layer for layer in arch.prunable_layers(model)}
    modules = dict(model.named_modules())
    if layers is not None:
        chosen: list[tuple[str, str, bool]] = []
        for layer in layers:
            name = layer.name if isinstance(layer, PrunableLayer) else str(layer)
            if name not in modules:
                raise RmtpError(f"layer {name!r} is not a module of the model")
            known = listed.get(name)
            role = layer.role if isinstance(layer, PrunableLayer) else (known.role if known else "other")
            optional = layer.optional if isinstance(layer, PrunableLayer) else bool(known and known.optional)
            chosen.append((name, role, optional))
        return chosen
    # Everything the adapter lists, plus what it leaves out on purpose but a reader would look for:
    # grouped/depthwise convs, and layers a pruner replaced (a replacement holding listed layers,
    # such as a token-pruning attention block around its qkv and proj, is not a row itself).
    chosen = []
    for name, module in modules.items():
        if name in listed:
            chosen.append((name, listed[name].role, listed[name].optional))
        elif is_replacement(module):
            if not any(other.startswith(name + ".") for other in listed):
                chosen.append((name, "replaced", False))
        elif isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
            chosen.append((name, "depthwise" if module.groups == module.in_channels else "grouped", False))
    return chosen


def _svd_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


@dataclass
class _Job:
    """One row of the analysis: a matrix to decompose, or a row already decided (skipped)."""

    row: LayerSpectrum
    matrix: torch.Tensor | None = None


def analyze_model(
    model: nn.Module,
    arch: Architecture,
    *,
    layers: Iterable[PrunableLayer | str] | None = None,
    split_qkv: bool = True,
    min_dim: int = MIN_DIM,
    alpha: float = 0.25,
    tw_confidence: float | None = None,
    progress: Progress = NULL_PROGRESS,
    threads: int | None = None,
) -> list[LayerSpectrum]:
    """Fit the MP law to every prunable weight matrix of ``model``, in forward order.

    ``layers``: the layers (``PrunableLayer``s or module names) to analyse; by default every
    layer ``arch`` lists, optional ones (head, patch embedding) included, plus skipped rows for
    the grouped/depthwise convs and replaced layers it does not list. ``split_qkv``: analyse a
    fused qkv projection as its q, k and v blocks (``arch.qkv_split``), which are separate maps.
    ``min_dim``: matrices with min(M, N) below it are skipped as too small. ``alpha`` and
    ``tw_confidence`` go to :func:`~rmtp.spectral.mp.fit_mp`.

    ``threads``: on the CPU, the SVDs run one matrix per thread, each single-threaded, on this
    many threads (default: ``torch.get_num_threads()``); torch's own thread count is set to 1
    meanwhile and restored after. Threaded LAPACK gains little on matrices of this size and, on
    a busy machine, its spinning threads can make a small SVD a hundred times slower.
    """
    _check(alpha, tw_confidence, min_dim)
    jobs = _plan(model, arch, layers, split_qkv=split_qkv, min_dim=min_dim)
    return _run(jobs, alpha=alpha, tw_confidence=tw_confidence, progress=progress, threads=threads)


def analyze_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    split_qkv: bool = True,
    min_dim: int = MIN_DIM,
    alpha: float = 0.25,
    tw_confidence: float | None = None,
    progress: Progress = NULL_PROGRESS,
    threads: int | None = None,
) -> list[LayerSpectrum]:
    """:func:`analyze_model` for weights with no architecture: every 2-D and 4-D floating-point
    tensor of ``state_dict``, in key order, named by its key (``blocks.0.attn.qkv.weight``).

    A key containing ``qkv`` whose rows divide by 3 is split into its q, k and v thirds (timm's
    fused layout) unless ``split_qkv`` is false. A 4-D weight with one input channel per filter (a
    depthwise conv, or a 1-channel stem) is listed as skipped, as are matrices with min(M, N) below
    ``min_dim``; grouped convs with more channels per group cannot be told from the weight alone.
    The fit and the rows are those of :func:`analyze_model`.
    """
    _check(alpha, tw_confidence, min_dim)
    jobs: list[_Job] = []
    for key, weight in state_dict.items():
        if not isinstance(weight, torch.Tensor) or weight.ndim not in (2, 4) or not weight.is_floating_point():
            continue
        qkv = "qkv" in key and weight.shape[0] % 3 == 0
        role = "qkv" if qkv else ("conv" if weight.ndim == 4 else "linear")
        if weight.ndim == 4 and weight.shape[1] == 1:
            reason = ("one input channel per filter (a depthwise conv, or a 1-channel stem): one small filter per "
                      "output channel, not one weight matrix")
            jobs.append(_Job(LayerSpectrum(name=key, module=key, role=role, weight_shape=tuple(weight.shape),
                                           shape=None, skipped=reason, module_params=weight.numel())))
            continue
        dim = weight.shape[0] // 3
        parts = {"q": slice(0, dim), "k": slice(dim, 2 * dim), "v": slice(2 * dim, 3 * dim)} \
            if qkv and split_qkv else None
        jobs += _matrix_jobs(key, key, role, weight, parts, optional=False, min_dim=min_dim)
    return _run(jobs, alpha=alpha, tw_confidence=tw_confidence, progress=progress, threads=threads)


def _check(alpha: float, tw_confidence: float | None, min_dim: int) -> None:
    check_alpha(alpha)
    if tw_confidence is not None:
        check_tw_confidence(tw_confidence)
    if min_dim < 1:
        raise ValueError(f"min_dim must be at least 1, got {min_dim}")


def _run(jobs: list[_Job], *, alpha: float, tw_confidence: float | None, progress: Progress,
         threads: int | None) -> list[LayerSpectrum]:
    results: list[LayerSpectrum] = []
    with progress.task("spectra", total=len(jobs)) as advance:
        for job, singular_values in zip(jobs, _singular_values(jobs, threads)):
            results.append(_finish(job, singular_values, alpha=alpha, tw_confidence=tw_confidence))
            advance(layer=job.row.name)
    return results


def _plan(model: nn.Module, arch: Architecture, layers: Iterable[PrunableLayer | str] | None, *,
          split_qkv: bool, min_dim: int) -> list[_Job]:
    jobs: list[_Job] = []
    for name, role, optional in _targets(model, arch, layers):
        module = model.get_submodule(name)
        reason = _why_not_a_matrix(module)
        if reason is not None:
            jobs.append(_Job(_skip(name, role, module, reason, optional=optional)))
            continue
        parts = arch.qkv_split(name, module) if split_qkv else None
        jobs += _matrix_jobs(name, name, role, module.weight, parts, optional=optional, min_dim=min_dim)
    return jobs


def _matrix_jobs(name: str, module: str, role: str, weight: torch.Tensor, parts: dict[str, slice] | None, *,
                 optional: bool, min_dim: int) -> list[_Job]:
    """The rows of one weight: the whole matrix, or its q, k, v blocks; too small ones skipped."""
    jobs = []
    matrix = weight_matrix(weight)
    for part, rows in (parts.items() if parts else [(None, None)]):
        block = matrix if rows is None else matrix[rows]
        span = None if rows is None else rows.indices(weight.shape[0])[:2]
        shape = (int(block.shape[0]), int(block.shape[1]))
        row = LayerSpectrum(name=name if part is None else f"{name}[{part}]", module=module, role=role,
                            weight_shape=tuple(weight.shape), shape=shape, optional=optional, rows=span)
        if min(shape) < min_dim:
            jobs.append(_Job(replace(row, skipped=f"too small: min(M, N) = {min(shape)} < min_dim {min_dim}")))
        else:
            jobs.append(_Job(row, block))
    return jobs


def _svdvals(matrix: torch.Tensor | None) -> np.ndarray | None:
    """Singular values (float32, or float64 for float64 weights); None for no matrix or non-finite input."""
    if matrix is None:
        return None
    with torch.no_grad():
        matrix = matrix.to(_svd_dtype(matrix))
        try:
            values = torch.linalg.svdvals(matrix).cpu().numpy()
        except RuntimeError:  # LAPACK refuses NaN/inf input; anything else is a real error
            if bool(torch.isfinite(matrix).all()):
                raise
            return np.array([np.nan])
    return values


def _singular_values(jobs: list[_Job], threads: int | None) -> Iterator[np.ndarray | None]:
    """The jobs' singular values, in order, computed on a pool of single-threaded SVDs on the CPU."""
    matrices = [job.matrix for job in jobs]
    on_cpu = all(m is None or m.device.type == "cpu" for m in matrices)
    workers = max(1, threads if threads is not None else torch.get_num_threads())
    if not on_cpu:
        yield from map(_svdvals, matrices)
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if workers == 1 or sum(m is not None for m in matrices) <= 1:
            yield from map(_svdvals, matrices)
        else:
            # OpenMP and MKL thread counts are per thread: a new thread starts with the machine's
            # default, whatever the main thread was set to, so each worker sets its own to 1.
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rmtp-svd",
                                    initializer=torch.set_num_threads, initargs=(1,)) as pool:
                yield from pool.map(_svdvals, matrices)
    finally:
        torch.set_num_threads(before)


def _finish(job: _Job, singular_values: np.ndarray | None, *, alpha: float,
            tw_confidence: float | None) -> LayerSpectrum:
    if job.matrix is None:
        return job.row
    if singular_values is None or not np.all(np.isfinite(singular_values)):
        return replace(job.row, skipped="non-finite weights (NaN or inf)")
    fit = fit_mp(singular_values, job.row.shape, alpha=alpha, tw_confidence=tw_confidence)
    return replace(job.row, fit=fit, singular_values=singular_values)
