"""What a model takes: input size and channels, classifier outputs; data that cannot fit is refused."""

from __future__ import annotations

import torch
from torch import nn

from rmtp.data.spec import DataSpec
from rmtp.errors import DataError


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model expects, from timm's pretrained config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)  # timm ViTs built with img_size=...
    in_chans = _first_conv_in_channels(model)
    if img_size is not None:
        return in_chans, int(img_size[0]), int(img_size[1])
    if size is not None:
        return in_chans, int(size[1]), int(size[2])
    return in_chans, 224, 224


def _first_conv_in_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def model_num_classes(model: nn.Module) -> int | None:
    """Outputs of the model's classifier head (timm's ``num_classes``, else the head layer's width);
    None when it cannot be told."""
    count = getattr(model, "num_classes", None)
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    if isinstance(head, nn.Linear):
        return head.out_features
    if isinstance(head, nn.Conv2d):
        return head.out_channels
    return None


def class_count_problem(where: str, data_classes: int, model_classes: int | None) -> str | None:
    """The message for data with ``data_classes`` classes on a head of ``model_classes`` outputs.

    Both ways fail badly if let through: more classes than outputs is an IndexError in the loss,
    fewer is a run that "succeeds" with logits no label can reach.
    """
    if model_classes is None or model_classes == data_classes:
        return None
    if model_classes == 0:
        return (f"{where} has {data_classes} classes but the model has no classifier head "
                f"(num_classes 0); set model.kwargs.num_classes: {data_classes}")
    return (f"{where} has {data_classes} classes but the model's head has {model_classes} outputs; "
            f"set model.kwargs.num_classes: {data_classes}, or use data with {model_classes} classes")


def check_class_count(where: str, data_classes: int, model: nn.Module) -> None:
    problem = class_count_problem(where, data_classes, model_num_classes(model))
    if problem is not None:
        raise DataError(problem)


def check_digits_size(spec: DataSpec, model: nn.Module, in_chans: int) -> None:
    """Refuse a ``data.img_size`` the model cannot take (:func:`model_takes`)."""
    if spec.img_size is None:
        return
    side = spec.img_size
    problem = model_takes(model, in_chans, (side, side))
    if problem is not None:
        _, height, width = model_input_size(model)
        raise DataError(f"data.img_size: the model cannot take {side}x{side} digits ({problem}); "
                        f"remove data.img_size to use the model's input size ({height}x{width}), "
                        f"or choose a size it accepts")


def model_takes(model: nn.Module, in_chans: int, size: tuple[int, int]) -> str | None:
    """Why ``model`` cannot take images of ``size`` (height, width), by one forward pass of a blank
    image; None when it can.

    Conv nets take most sizes but not every one (a ConvNeXt needs 32 px), a ViT only its own
    ``img_size``; a trial forward is the one check that knows every model. Skipped at the model's
    own input size, which always fits.
    """
    _, height, width = model_input_size(model)
    if tuple(size) == (height, width):
        return None
    param = next(model.parameters(), None)
    blank = torch.zeros(1, in_chans, *size, device=param.device if param is not None else "cpu")
    # Modes restored module by module: a part the caller froze in eval stays in eval.
    modes = {module: module.training for module in model.modules()}
    try:
        with torch.no_grad():
            model.eval()(blank)
    except (RuntimeError, AssertionError, ValueError) as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    finally:
        for module, training in modes.items():
            module.training = training
    return None
