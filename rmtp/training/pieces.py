"""The pieces of the training loop, public so tests and recipes can check each one directly:
the lr schedule, the losses (CE with label smoothing or soft targets, Hinton KD), the seeded shift
augmentation, AdamW's parameter groups, the elastic-net penalty and the keep-zeros masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rmtp.errors import RmtpError
from rmtp.training.config import AUGMENT_SHIFT, TrainConfig

#: Parameters whose name contains one of these are never weight-decayed (nor are 1-D ones:
#: norms and biases). Decaying a position embedding or a class token towards zero only hurts.
NO_DECAY_TOKENS = ("pos_embed", "cls_token", "dist_token", "reg_token")




def lr_at(step: int, *, total_steps: int, warmup_steps: int, lr: float, min_lr_ratio: float = 0.0,
          time_fraction: float | None = None) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    Warm-up: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (so the first step is
    not wasted at lr 0 and the last warm-up step reaches ``lr``). Then a cosine from ``lr`` down to
    ``floor = lr * min_lr_ratio``::

        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        lr_step  = floor + (lr - floor) * (1 + cos(pi * progress)) / 2

    ``step == total_steps`` (one past the last step) gives exactly ``floor``.

    ``time_fraction`` (a ``max_minutes`` budget: the share of it spent) makes the cosine's progress
    ``max(progress, time_fraction)`` after warm-up: the decay follows whichever budget, steps or
    minutes, is nearer its end, so the lr reaches ``floor`` when the minutes run out.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    floor = lr * min_lr_ratio
    decay_steps = max(1, total_steps - warmup_steps)
    progress = (step - warmup_steps) / decay_steps
    if time_fraction is not None:
        progress = max(progress, time_fraction)
    progress = min(1.0, max(0.0, progress))
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton distillation loss: ``τ² · KL(p_teacher ‖ p_student)`` at temperature ``τ``, batch mean.

    ``τ²`` keeps the gradient scale independent of the temperature. Zero when the logits agree.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / t, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def training_loss(student_logits: torch.Tensor, targets: torch.Tensor,
                  teacher_logits: torch.Tensor | None, config: TrainConfig) -> torch.Tensor:
    """The loss :func:`train` minimises: CE (with label smoothing), or ``(1-w)·CE + w·KD`` when distilling.

    ``targets`` are class indices, or (after mixup) soft targets, one row of class probabilities
    per image, whose label smoothing is already folded in: then CE is ``Σ −t·log softmax`` (timm's
    ``SoftTargetCrossEntropy``). With ``w = 1`` the targets are never read (unlabeled images carry
    no class index).
    """
    if config.distill is not None and config.distill.weight == 1.0:
        if teacher_logits is None:
            raise RmtpError("finetune.distill is set but no teacher logits were given")
        return kd_loss(student_logits, teacher_logits, config.distill.temperature)
    if targets.dtype.is_floating_point:
        ce = torch.sum(-targets * F.log_softmax(student_logits, dim=-1), dim=-1).mean()
    else:
        ce = F.cross_entropy(student_logits, targets, label_smoothing=config.label_smoothing)
    if config.distill is None:
        return ce
    if teacher_logits is None:
        raise RmtpError("finetune.distill is set but no teacher logits were given")
    w = config.distill.weight
    kd = kd_loss(student_logits, teacher_logits, config.distill.temperature)
    if w == 1.0:
        return kd
    if w == 0.0:
        return ce
    return (1.0 - w) * ce + w * kd


def augment_batch(images: torch.Tensor, generator: torch.Generator, shift: int = AUGMENT_SHIFT) -> torch.Tensor:
    """Translate each image of a (B, C, H, W) batch by up to ``±shift`` px: replicate-pad, random crop.

    Replicate padding extends the background instead of drawing a frame around the image. The
    offsets come from ``generator`` (a CPU generator), so the augmentation is seeded.
    """
    if shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator).to(images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=images.device)  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices/kernels only, none on 1-D params and ``NO_DECAY_TOKENS``."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or any(token in name for token in NO_DECAY_TOKENS):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def elastic_net(weights: Sequence[torch.Tensor], l1: float, l2: float) -> torch.Tensor | None:
    """λ₁·Σ|w| + λ₂·Σw² over ``weights`` (the seeds' regularised fine-tune), ``None`` when both are 0.

    Sums, not means, as in the elastic-net objective the seeds analyse: λ is per weight entry, so a
    value tuned on one model size means the same pull on each weight of another.
    """
    if not weights or (l1 == 0.0 and l2 == 0.0):
        return None
    total = weights[0].new_zeros(())
    for w in weights:
        if l1:
            total = total + l1 * w.abs().sum()
        if l2:
            total = total + l2 * w.pow(2).sum()
    return total


def penalized_weights(model: nn.Module, names: Iterable[str]) -> list[nn.Parameter]:
    """The Linear/Conv weights inside the named submodules (a split layer's two factors included)."""
    weights: dict[int, nn.Parameter] = {}
    for name in names:
        try:
            root = model.get_submodule(name)
        except AttributeError as exc:
            raise RmtpError(f"penalize: the model has no submodule {name!r}") from exc
        for module in root.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                weights[id(module.weight)] = module.weight
    return list(weights.values())


def masked_layers(model: nn.Module) -> list[str]:
    """Linear/Conv layers whose weight has exact zeros: their zero pattern is a mask to keep fixed.

    Derived from the weights rather than remembered from earlier steps, so it also holds for a
    model loaded from a saved folder, and for the factors of split layers. Norm weights are not
    masks (timm zero-initialises some BatchNorm scales) and are left free.
    """
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and bool((module.weight == 0).any())]


def zero_masks(model: nn.Module, names: Iterable[str]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(weight, keep-mask) of each named submodule: the mask is 1 where the weight is non-zero now."""
    masks = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise RmtpError(f"keep_zeros: the model has no submodule {name!r}") from exc
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise RmtpError(f"keep_zeros: submodule {name!r} ({type(module).__name__}) has no weight parameter")
        masks.append((weight, (weight.detach() != 0).to(weight.dtype)))
    return masks


