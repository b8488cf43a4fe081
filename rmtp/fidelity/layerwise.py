"""Layer inputs on calibration data, and layer-by-layer compression that fits each layer to the
inputs the already-compressed model gives it.

Data-aware compressors (Wanda scores, prune–restore, SparseGPT, whitened low rank) all need the same
thing from calibration data: what a layer's inputs look like, as the GEMM the layer computes sees
them. :class:`LayerInputs` holds it (rows seen, per-feature sums of squares, the Gram matrix XᵀX,
both in float64), in the GEMM K order of :mod:`rmtp.gemm`: a Linear's input features; a Conv2d's
im2col columns, (r, s, c) with the input channel fastest (:func:`input_columns`).

Two ways to collect them:

* :func:`collect_input_stats`: one pass over the calibration data, every watched layer at once, on
  the model as it is (the dense model, for scores computed before anything changes).
* :func:`compress_sequentially`: layer by layer in forward order, each layer's inputs collected on
  the *current* model, i.e. after the layers before it were compressed, then ``compress`` is
  called on that layer before the next one is looked at. Each layer is thus fitted to inputs that
  already carry the earlier layers' errors, so a later layer can correct for them instead of
  errors compounding (SparseGPT's and GPTQ's sequential drivers do the same block by block).

**Cost of** :func:`compress_sequentially`: one forward pass over the calibration data per layer,
each stopped (by a private exception from a pre-hook) as soon as that layer's input is captured.
A layer at depth d of L costs about d/L of a full pass, so L layers spread evenly cost about L/2
full passes (ViT-Ti's 48 block Linears: ~24 passes), plus one stopped pass on the first batch to
learn the forward order. Nothing is cached between layers: memory stays at one Gram matrix.
Measured: ViT-Ti, 128 calibration images, 48 layers, about 10 minutes on 2 busy CPU cores (one
plain pass of :func:`collect_input_stats`: about 30 s). Grouping the layers of one block on the
block's input (as SparseGPT's reference driver does) would cut the passes about fourfold, at the
price of layers in a block not seeing each other's compression.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rmtp.data.bundle import batch_images
from rmtp.run.progress import NULL_PROGRESS, Progress

__all__ = ["LayerInputs", "collect_input_stats", "compress_sequentially", "input_columns"]


@dataclass
class LayerInputs:
    """What a layer's inputs look like on the calibration data, in the GEMM K order.

    ``count`` is the number of GEMM input rows seen (tokens × images for a Linear in a ViT; output
    pixels × images for a Conv2d). ``sq_norms[k] = Σ_t x_tk²`` (what Wanda scores use) and
    ``gram = Σ_t x_t x_tᵀ`` (K × K, what least-squares fits and OBS updates use) are float64 sums
    over those rows, or ``None`` when not asked for or when no row was seen; with the Gram comes
    ``sums = Σ_t x_t`` (K, float64: what a least-squares refit of the layer's bias needs, the Gram of
    the inputs with a constant 1 appended). A layer the calibration data never reaches has
    ``count == 0``.
    """

    count: int = 0
    images: int = 0
    batches: int = 0
    sq_norms: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    sums: torch.Tensor | None = None

    @property
    def positions(self) -> float:
        """GEMM rows per image (tokens; output pixels of a conv); 0.0 for a layer no image reached."""
        return self.count / self.images if self.images else 0.0

    def add(self, columns: torch.Tensor, images: int, *, squares: bool = True, gram: bool = True) -> None:
        """Accumulate one batch of GEMM input rows ``columns`` (rows × K) from ``images`` images.

        Each batch's Gram is computed in float32 (float64 if the activations are float64;
        low-precision activations under autocast are widened first, and autocast is off for the
        product, which it would otherwise run in fp16/bf16: an fp16 Gram overflows to inf over a
        ResNet's 50k rows per batch) and summed in float64, so the totals do not drift over many
        batches; squares are float64 throughout."""
        work = torch.float64 if columns.dtype == torch.float64 else torch.float32
        cols = columns.detach().to(work)
        self.count += cols.shape[0]
        self.images += images
        self.batches += 1
        if squares:
            part = cols.double().pow(2).sum(0)  # cheap (rows × K): exact squares of the activations
            self.sq_norms = part if self.sq_norms is None else self.sq_norms + part
        if gram:
            with torch.autocast(cols.device.type, enabled=False):
                part = (cols.T @ cols).double()
            self.gram = part if self.gram is None else self.gram + part
            total = cols.double().sum(0)
            self.sums = total if self.sums is None else self.sums + total


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The GEMM input rows of a Linear or Conv2d for its input ``x``: (rows, K), K in the layout of
    :mod:`rmtp.gemm` (a conv's im2col columns ordered (r, s, c), input channel fastest), so that
    ``input_columns(layer, x) @ gemm_view(layer.weight).T`` is the layer's output without bias."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        raise TypeError(f"input columns need a Linear or an ungrouped Conv2d, got {type(module).__name__}")
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride)
    b, _, positions = cols.shape
    c = module.in_channels
    rs = module.kernel_size[0] * module.kernel_size[1]
    return cols.reshape(b, c, rs, positions).permute(0, 3, 2, 1).reshape(b * positions, rs * c)


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the calibration passes; the caller's mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def collect_input_stats(model: nn.Module, layers: dict[str, nn.Module], loader: Iterable, device: torch.device, *,
                        squares: bool, gram: bool, max_batches: int | None = None,
                        precision: str = "fp32") -> dict[str, LayerInputs]:
    """Run ``loader``'s images through ``model`` once (eval, no grad, under ``precision``'s autocast)
    and gather :class:`LayerInputs` for every named layer at once: rows and positions always,
    Σx² per input column when ``squares``, the Gram matrix when ``gram``. ``layers`` maps names to
    the plain Linear/Conv2d modules to watch (hooked directly, so a wrapper around them does not
    hide what they receive)."""
    from rmtp.run.precision import autocast

    stats = {name: LayerInputs() for name in layers}
    current = {"images": 0}

    def hook(name: str, module: nn.Module) -> Callable:
        def record(_module: nn.Module, args: tuple) -> None:
            stats[name].add(input_columns(module, args[0]), current["images"], squares=squares, gram=gram)
        return record

    with ExitStack() as stack, _inference(model):
        for name, module in layers.items():
            stack.callback(module.register_forward_pre_hook(hook(name, module)).remove)
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            images = batch_images(batch)
            current["images"] = images.shape[0]
            with autocast(precision, device):
                model(images.to(device))
    return stats


class _Captured(Exception):
    """Raised from a pre-hook once the watched layer's input is recorded: the rest of the forward
    pass is not needed."""


def _forward_order(model: nn.Module, names: Sequence[str], calibration: Iterable, device: torch.device,
                   precision: str) -> list[str]:
    """``names`` in the order the model first calls them on one calibration batch (one pass,
    stopped once every layer ran); layers the batch never reaches go last, in the given order."""
    from rmtp.run.precision import autocast

    unique = list(dict.fromkeys(names))
    seen: list[str] = []

    def hook(name: str) -> Callable:
        def record(_module: nn.Module, _args: tuple) -> None:
            if name not in seen:
                seen.append(name)
                if len(seen) == len(unique):
                    raise _Captured
        return record

    with ExitStack() as stack, _inference(model):
        for name in unique:
            stack.callback(model.get_submodule(name).register_forward_pre_hook(hook(name)).remove)
        for batch in calibration:
            try:
                with autocast(precision, device):
                    model(batch_images(batch).to(device))
            except _Captured:
                pass
            break
    return seen + [name for name in unique if name not in seen]


def _layer_inputs(model: nn.Module, name: str, calibration: Iterable, device: torch.device,
                  precision: str) -> LayerInputs:
    """:class:`LayerInputs` (squares and Gram) of one layer on the model as it is now: one forward
    pass per batch, each stopped right after the layer's input is recorded."""
    from rmtp.run.precision import autocast

    module = model.get_submodule(name)
    inputs = LayerInputs()
    current = {"images": 0}

    def record(_module: nn.Module, args: tuple) -> None:
        inputs.add(input_columns(module, args[0]), current["images"])
        raise _Captured

    with ExitStack() as stack, _inference(model):
        stack.callback(module.register_forward_pre_hook(record).remove)
        for batch in calibration:
            images = batch_images(batch)
            current["images"] = images.shape[0]
            try:
                with autocast(precision, device):
                    model(images.to(device))
            except _Captured:
                pass
    return inputs


def compress_sequentially(model: nn.Module, layer_names: Sequence[str], calibration: Iterable,
                          device: torch.device, *, compress: Callable[[str, nn.Module, LayerInputs], None],
                          progress: Progress = NULL_PROGRESS, precision: str = "fp32",
                          description: str = "layer-wise compression") -> None:
    """Compress ``layer_names`` one at a time in forward order, each on its inputs in the model as
    compressed so far.

    For each layer (a plain Linear or Conv2d, named as in ``model.named_modules()``): collect its
    :class:`LayerInputs` (``gram``, ``sq_norms``, ``count``) over every batch of ``calibration``
    (images, or tuples whose first item is the images) run through the *current* model, in eval
    mode, without grad, under ``precision``'s autocast; then call ``compress(name, module,
    inputs)`` (under ``torch.no_grad``), which changes the layer in place or replaces it with
    ``model.set_submodule``. The next layer's inputs then already carry this layer's compression.
    A layer the calibration data never reaches gets empty inputs (``count == 0``, no Gram):
    ``compress`` decides what that means. Layers that read the same tensor need no special case:
    each is collected after the ones before it were compressed. A layer called more than once per
    forward pass (a shared module) contributes its first call only.

    Cost: one stopped forward pass per layer over the calibration data (module docstring). The
    loader is read once and its images kept (on its device, the CPU for rmtp's loaders), so an image
    folder is decoded once, not once per layer.
    """
    if not layer_names:
        return
    # read once, batch by batch as the loader gives them (so every batch's Gram is what it was):
    # each layer's pass reuses them instead of decoding the images again, layer after layer
    calibration = [batch_images(batch) for batch in calibration]
    names = _forward_order(model, layer_names, calibration, device, precision)
    with progress.task(description, total=len(names)) as advance:
        for name in names:
            inputs = _layer_inputs(model, name, calibration, device, precision)
            with torch.no_grad():
                compress(name, model.get_submodule(name), inputs)
            advance()
