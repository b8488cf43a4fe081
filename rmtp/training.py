"""The one training loop of rmtp: train a reference model, fine-tune a pruned one, distil.

:func:`train` runs AdamW with a linear warm-up then a per-step cosine decay, cross-entropy (with
optional label smoothing) and/or knowledge distillation from a teacher, gradient clipping and a
val top-1 after every epoch. It is seeded end to end (``torch.manual_seed``, a seeded shuffle and
a seeded augmentation generator), so the same seed on the same machine gives the same weights.

Layers a mask pruner zeroed stay zeroed through fine-tuning when named in ``keep_zeros``.

Like the rest of the library, the loop never prints: it reports through the ``on_epoch`` and
``on_batch`` callbacks and raises :class:`~rmtp.errors.RmtpError` for bad input.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from rmtp import distributed
from rmtp.data import DataBundle
from rmtp.errors import RmtpError
from rmtp.measure import top1

#: Largest shift, in pixels, of the ``augment`` random translation.
AUGMENT_SHIFT = 2

#: Parameters whose name contains one of these are never weight-decayed (nor are 1-D ones:
#: norms and biases). Decaying a position embedding or a class token towards zero only hurts.
NO_DECAY_TOKENS = ("pos_embed", "cls_token", "dist_token", "reg_token")


class DistillConfig(BaseModel):
    """Knowledge distillation from a teacher (the dense model, when fine-tuning a pruned one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(1.0, ge=0.0, le=1.0,
                          description="share of the KD loss in the total: (1-w)*CE + w*KD")
    temperature: float = Field(2.0, gt=0.0, le=100.0,
                               description="softmax temperature of both teacher and student logits")


class TrainConfig(BaseModel):
    """How to train or fine-tune: the ``finetune`` step's params and the reference model's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(1, ge=1, le=10_000, description="passes over the train split")
    lr: float = Field(1e-4, gt=0.0, le=10.0, description="peak learning rate (after warm-up)")
    weight_decay: float = Field(0.05, ge=0.0, le=10.0,
                                description="AdamW decoupled weight decay (never on norms, biases, "
                                            "pos_embed, cls_token)")
    batch_size: int | None = Field(None, ge=1, le=65_536,
                                   description="train batch size (default: the data's batch size)")
    warmup_epochs: float = Field(0.0, ge=0.0, le=10_000,
                                 description="linear warm-up length in epochs (fractions allowed)")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0,
                                description="floor of the cosine decay, as a share of lr")
    grad_clip: float | None = Field(1.0, gt=0.0,
                                    description="clip the global gradient norm to this (None: no clipping)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0,
                                   description="label smoothing of the cross-entropy term")
    distill: DistillConfig | None = Field(None,
                                          description="distil from a teacher (needs a teacher model)")
    l1: float = Field(0.0, ge=0.0, le=1.0,
                      description="elastic-net L1 penalty λ₁·Σ|w| on the pruned layers' weights")
    l2: float = Field(0.0, ge=0.0, le=1.0,
                      description="elastic-net L2 penalty λ₂·Σw² on the pruned layers' weights")
    augment: bool = Field(False, description=f"random translation by up to ±{AUGMENT_SHIFT} px "
                                             "(pad + random crop of each batch), seeded")
    seed: int | None = Field(None, ge=0, description="seed of init-independent randomness: shuffle, "
                                                     "augmentation, dropout (None: not seeded)")


@dataclass
class EpochStats:
    """What one epoch did. ``val_top1`` is in percent (as :func:`rmtp.measure.top1`); ``lr`` is the last step's."""

    epoch: int
    train_loss: float
    val_top1: float
    lr: float
    seconds: float


@dataclass
class TrainResult:
    """A whole run: one :class:`EpochStats` per epoch, the last val top-1 (percent), and wall seconds."""

    history: list[EpochStats] = field(default_factory=list)
    final_val_top1: float = 0.0
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# Pieces (public so the tests and the recipe can check them directly)
# --------------------------------------------------------------------------------------------


def lr_at(step: int, *, total_steps: int, warmup_steps: int, lr: float, min_lr_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    Warm-up: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (so the first step is
    not wasted at lr 0 and the last warm-up step reaches ``lr``). Then a cosine from ``lr`` down to
    ``floor = lr * min_lr_ratio``::

        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        lr_step  = floor + (lr - floor) * (1 + cos(pi * progress)) / 2

    ``step == total_steps`` (one past the last step) gives exactly ``floor``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    floor = lr * min_lr_ratio
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
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
    """The loss :func:`train` minimises: CE (with label smoothing), or ``(1-w)·CE + w·KD`` when distilling."""
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


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(
    model: nn.Module,
    bundle: DataBundle,
    config: TrainConfig,
    *,
    device: torch.device | str,
    teacher: nn.Module | None = None,
    keep_zeros: Sequence[str] = (),
    penalize: Sequence[str] = (),
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``bundle.train``; val top-1 on ``bundle.val`` after every epoch.

    The val top-1 is :func:`rmtp.measure.top1` (percent, eval mode, modes restored).

    ``model`` (and ``teacher``) are moved to ``device``. The teacher runs in eval mode under
    ``no_grad`` and its mode is restored afterwards; ``model`` ends in the mode it came in.

    ``keep_zeros`` names submodules (e.g. Linears a mask pruner sparsified) whose weights' exact
    zeros must survive fine-tuning. Both halves are needed:

    * gradients of masked entries are zeroed after ``backward`` so they neither eat into the
      gradient-clipping norm nor feed AdamW's moment estimates (the surviving weights then train
      exactly as if the pruned ones did not exist);
    * the weights are re-masked after every optimizer step, which makes "still exactly zero" a
      guarantee rather than a consequence of AdamW's arithmetic (``eps``, decoupled decay, a
      different optimizer or tied parameters could otherwise move a masked entry off zero).

    ``penalize`` names submodules (the pruned layers) whose Linear/Conv weights get the
    ``l1``/``l2`` elastic-net penalty of the config.

    Under ``torchrun`` (a process group is initialised, see :mod:`rmtp.distributed`) the model is
    wrapped in DistributedDataParallel and each process sees its share of every epoch through a
    DistributedSampler; ``batch_size`` stays the *global* batch (split evenly over processes),
    so a recipe means the same optimisation on 1 or N processes. Reported losses are averaged
    over all processes.

    ``on_batch(batch, batches)`` is called after every optimizer step (``batch`` 1-based, within
    the epoch); ``on_epoch(stats)`` after every epoch's evaluation.

    Raises :class:`RmtpError` if ``config.distill`` is set without a ``teacher``, if a
    ``keep_zeros`` name is not a weighted submodule, if the train split is empty or the loss
    stops being finite.
    """
    if config.distill is not None and teacher is None:
        raise RmtpError("finetune.distill is set but there is no teacher model to distil from")
    device = torch.device(device)
    seed = _run_seed(config)
    world = distributed.world_size()
    loader, sampler = _train_loader(bundle, config, seed, world)
    val_loader = bundle.loader("val")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise RmtpError("training: the train split is empty")
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = min(total_steps, round(config.warmup_epochs * steps_per_epoch))
    aug_generator = torch.Generator().manual_seed(seed + 1)

    was_training = model.training
    model.to(device)
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None and config.distill is not None:
        teacher.to(device).eval()
    else:
        teacher = None  # distill unset: a teacher passed anyway is not used
    run = _prepare_steps(model, teacher, config, device, world, keep_zeros, penalize, aug_generator,
                         total_steps, warmup_steps)

    result = TrainResult()
    started = time.perf_counter()
    try:
        for epoch in range(1, config.epochs + 1):
            epoch_start = time.perf_counter()
            train_loss = _train_epoch(run, model, loader, sampler, epoch, steps_per_epoch, on_batch)
            val_top1 = top1(model, val_loader, device=device)
            stats = EpochStats(epoch=epoch, train_loss=train_loss, val_top1=val_top1,
                               lr=run.lr, seconds=time.perf_counter() - epoch_start)
            result.history.append(stats)
            if on_epoch is not None:
                on_epoch(stats)
    finally:
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_was_training)
    result.final_val_top1 = result.history[-1].val_top1
    result.seconds = time.perf_counter() - started
    return result


def _run_seed(config: TrainConfig) -> int:
    """The seed of the run's shuffle and augmentation. With ``config.seed`` torch is seeded too
    (init-independent randomness: dropout), so the run repeats; without it a seed is drawn from
    torch's current state, so two unseeded runs differ but each still shuffles consistently."""
    if config.seed is not None:
        torch.manual_seed(config.seed)
    return config.seed if config.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))


def _train_loader(bundle: DataBundle, config: TrainConfig, seed: int,
                  world: int) -> tuple[DataLoader, DistributedSampler | None]:
    """The shuffled train loader (seeded by ``seed``) and, under torchrun, its sampler.

    ``batch_size`` is the *global* batch: with ``world`` processes each gets its share of every
    epoch through a DistributedSampler and batches of ``global / world``, so a recipe means the
    same optimisation on 1 or N processes (which is why it must split evenly).
    """
    global_batch = config.batch_size or bundle.batch_size
    if global_batch % world:
        raise RmtpError(f"finetune.batch_size {global_batch} does not split evenly over {world} processes")
    if world > 1:
        sampler = DistributedSampler(bundle.train, num_replicas=world, rank=distributed.rank(), shuffle=True,
                                     seed=seed)
        loader = DataLoader(bundle.train, batch_size=global_batch // world, sampler=sampler,
                            num_workers=bundle.num_workers)
        return loader, sampler
    return bundle.loader("train", shuffle=True, seed=seed, batch_size=global_batch), None


@dataclass
class _Steps:
    """What every optimizer step of one run shares, and where the run is in its schedule.

    ``step`` counts optimizer steps across epochs (the lr schedule spans the whole run); ``lr``
    is the last step's learning rate, which :class:`EpochStats` reports.
    """

    config: TrainConfig
    device: torch.device
    #: The model, or its DistributedDataParallel wrapper under torchrun (which averages gradients).
    forward: nn.Module
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    #: Every trainable parameter, clipped together by ``grad_clip``.
    params: list[nn.Parameter]
    masks: list[tuple[nn.Parameter, torch.Tensor]]
    penalized: list[nn.Parameter]
    aug_generator: torch.Generator
    total_steps: int
    warmup_steps: int
    step: int = 0
    lr: float = 0.0


def _prepare_steps(model: nn.Module, teacher: nn.Module | None, config: TrainConfig, device: torch.device,
                   world: int, keep_zeros: Sequence[str], penalize: Sequence[str], aug_generator: torch.Generator,
                   total_steps: int, warmup_steps: int) -> _Steps:
    """Masks, penalised weights, the DDP wrapper and AdamW for a model already on ``device``.

    The keep-zeros masks are taken now, before any step, so they record the pruner's zeros only.
    """
    masks = [(p, m.to(device)) for p, m in zero_masks(model, keep_zeros)]
    penalized = penalized_weights(model, penalize)
    forward = DistributedDataParallel(model) if world > 1 else model
    groups = param_groups(model, config.weight_decay)
    if not groups:
        raise RmtpError("training: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    params = [p for g in groups for p in g["params"]]
    return _Steps(config=config, device=device, forward=forward, teacher=teacher, optimizer=optimizer, params=params,
                  masks=masks, penalized=penalized, aug_generator=aug_generator, total_steps=total_steps,
                  warmup_steps=warmup_steps, lr=config.lr)


def _train_epoch(run: _Steps, model: nn.Module, loader: DataLoader, sampler: DistributedSampler | None, epoch: int,
                 steps_per_epoch: int, on_batch: Callable[[int, int], None] | None) -> float:
    """One pass over the train split in train mode; the mean train loss over all processes.

    ``sampler.set_epoch`` reshuffles each process's shard differently every epoch (the same way
    on every process, so the shards stay disjoint).
    """
    model.train()
    if sampler is not None:
        sampler.set_epoch(epoch)
    loss_sum, seen = 0.0, 0
    for batch_index, (images, targets) in enumerate(loader, start=1):
        loss = _train_step(run, images, targets, epoch, batch_index)
        loss_sum += float(loss.detach()) * targets.numel()
        seen += targets.numel()
        if on_batch is not None:
            on_batch(batch_index, steps_per_epoch)
    loss_sum, seen = distributed.all_reduce_sum([loss_sum, float(seen)], run.device)
    return loss_sum / max(1, seen)


def _train_step(run: _Steps, images: torch.Tensor, targets: torch.Tensor, epoch: int,
                batch_index: int) -> torch.Tensor:
    """One optimizer step on one batch; returns its loss (penalty included).

    The lr is set from the schedule before the step. Gradients of masked entries are zeroed
    before clipping (so they neither count in the norm nor feed AdamW's moments) and the weights
    are re-masked after the step, so pruned zeros stay exactly zero (see :func:`train`).
    """
    config = run.config
    run.lr = lr_at(run.step, total_steps=run.total_steps, warmup_steps=run.warmup_steps,
                   lr=config.lr, min_lr_ratio=config.min_lr_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr
    images, targets = images.to(run.device), targets.to(run.device)
    if config.augment:
        images = augment_batch(images, run.aug_generator)
    teacher_logits = None
    if run.teacher is not None:
        with torch.no_grad():
            teacher_logits = run.teacher(images)
    logits = run.forward(images)
    loss = training_loss(logits, targets, teacher_logits, config)
    penalty = elastic_net(run.penalized, config.l1, config.l2)
    if penalty is not None:
        loss = loss + penalty
    if not torch.isfinite(loss):
        raise RmtpError(f"training diverged: loss is {loss.item()} at epoch {epoch}, "
                        f"step {batch_index} (lower lr or set grad_clip)")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for param, mask in run.masks:
        if param.grad is not None:
            param.grad.mul_(mask)
    if config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(run.params, config.grad_clip)
    run.optimizer.step()
    with torch.no_grad():
        for param, mask in run.masks:
            param.mul_(mask)
    run.step += 1
    return loss
