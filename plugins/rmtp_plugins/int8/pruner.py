"""How ``int8`` quantizes (:class:`rmtp_plugins.int8.Int8Pruner` runs :func:`prune`): measure how
much quantizing each selected Linear layer alone moves the model's predictions on calibration
images, keep the sensitive layers in float, put :class:`~rmtp_plugins.int8.linear.Int8Linear` in
place of the others."""

from __future__ import annotations

import torch
from torch import nn

from rmtp.contract.pruner import LayerRow, PruneContext, PruneResult, weight_footprint
from rmtp.errors import DataError, RmtpError
from rmtp.fidelity.agreement import DenseReference
from rmtp.fidelity.blockwise import calibration_images
from rmtp.run.progress import NULL_PROGRESS, Progress
from rmtp_plugins.int8.linear import Int8Linear
from rmtp_plugins.int8.params import Int8Params


def prune(ctx: PruneContext, params: Int8Params) -> PruneResult:
    layers = {layer.name: ctx.module(layer) for layer in ctx.layers}
    linears = [name for name, module in layers.items() if type(module) is nn.Linear]
    kls = _step_sensitivities(ctx, linears, params) if params.screen and ctx.calibration is not None else {}
    rows = []
    for name, module in layers.items():
        shape, n_params, nonzeros = weight_footprint(module)
        row = LayerRow(layer=name, shape_before=shape, shape_after=shape, params_before=n_params,
                       params_after=n_params, nonzeros_before=nonzeros, nonzeros_after=nonzeros)
        kl = kls.get(name)
        if kl is not None:
            row.detail["KL alone"] = float(f"{kl:.3g}")
        if name not in linears:
            row.skipped = f"{type(module).__name__} (int8 replaces nn.Linear layers only)"
        elif kl is not None and kl > params.max_layer_kl:
            row.skipped = f"sensitive: KL {kl:.3g} > max_layer_kl {params.max_layer_kl:g}, kept in float"
        else:
            quantized = Int8Linear.from_linear(module)
            ctx.model.set_submodule(name, quantized)
            row.nonzeros_after = weight_footprint(quantized)[2]
            row.budget = row.kept_fraction = 1.0
            row.note = "int8" if kl is not None else "int8 (not screened: screen: false)"
        rows.append(row)
    return PruneResult(rows)


def _step_sensitivities(ctx: PruneContext, names: list[str], params: Int8Params) -> dict[str, float]:
    """:func:`sensitivities`, once per step: an accuracy budget's candidates differ only in
    ``max_layer_kl``, the threshold applied to the same measurements."""
    def measure() -> dict[str, float]:
        images = _screen_images(ctx.calibration, params.screen_images)
        return sensitivities(ctx.model, names, images, ctx.device, ctx.progress)

    return ctx.step_cached("int8.kl", names, params, varies={"max_layer_kl"}, compute=measure)


def _screen_images(loader, count: int) -> torch.Tensor:
    """The first ``count`` calibration images (fewer when the loader has fewer), as one tensor."""
    try:
        return calibration_images(loader, count, who="int8")
    except RmtpError:  # the only one it raises: no images; say what to do instead
        raise DataError("int8: the calibration images are empty, so no layer can be screened; give data "
                        "with calibration images, or set screen: false to quantize every selected layer") from None


@torch.no_grad()
def sensitivities(model: nn.Module, names: list[str], images: torch.Tensor, device: torch.device,
                  progress: Progress = NULL_PROGRESS, batch: int = 32) -> dict[str, float]:
    """Per layer, KL(model ‖ model with that layer alone int8) of the predicted class distributions,
    mean over ``images`` (:class:`~rmtp.fidelity.agreement.DenseReference`, in fp32): how far that
    one layer's quantization moves the output the user sees. Measured on the model as it comes
    (earlier steps included), in eval mode, ``batch`` images per call: the kernel quantizes each
    call's input with one scale, so the batches are part of what is measured."""
    reference = DenseReference(model, images, device=device, batch=batch)
    kls = {}
    with progress.task("int8: layer sensitivity", total=len(names)) as advance:
        for name in names:
            original = model.get_submodule(name)
            model.set_submodule(name, Int8Linear.from_linear(original))
            try:
                kls[name] = reference.score(model)[1]
            finally:
                model.set_submodule(name, original)
            advance()
    return kls


__all__ = ["prune", "sensitivities"]
