"""The one training loop of rmtp: train a reference model, fine-tune a pruned one, distil.

:func:`train` runs AdamW with a linear warm-up then a per-step cosine decay, cross-entropy (with
optional label smoothing, or soft targets after mixup) and/or knowledge distillation from a
teacher, gradient clipping and a val top-1 after every epoch; optionally under autocast (bf16, or
fp16 with a GradScaler), in channels-last, with gradient accumulation and ``torch.compile``. It is
seeded end to end (``torch.manual_seed``, a seeded shuffle and a seeded augmentation generator),
so the same seed on the same machine gives the same weights — also across a kill: given the
:class:`~rmtp.training.state.TrainState` of its last checkpoint, a run continues to the same final
weights as one never interrupted (bit for bit on the CPU with ``num_workers: 0``).

Layers a mask pruner zeroed stay zeroed through fine-tuning when named in ``keep_zeros``.

Budgets: ``epochs``, ``max_steps`` (optimizer steps) and ``max_minutes`` (wall clock, from the start of
:func:`train`, epoch-end evaluations included; a resumed run continues with the minutes its
checkpoint had left). A minutes budget is checked before every optimizer step (one step at least
is taken) and decays the cosine by the share of it spent when that is ahead of the steps' share,
so the lr reaches its floor as the time runs out; such a run depends on the machine's speed and is
not repeatable bit for bit.

Unlabeled data (``bundle.labeled`` False) trains on distillation alone (``distill.weight`` 1.0; any
loss that needs labels is refused in one line) and is scored after each epoch by top-1 agreement
with the teacher instead of top-1 (``val_top1`` None, ``val_agreement``).

Like the rest of the library, the loop never prints: it reports through the ``on_epoch``,
``on_batch`` and ``on_checkpoint`` callbacks and raises :class:`~rmtp.errors.RmtpError` for bad
input.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from rmtp.data import DataBundle
from rmtp.data.augment import TrainAugment
from rmtp.errors import RmtpError
from rmtp.measure import agreement, top1
from rmtp.run import distributed
from rmtp.run.precision import autocast, check_precision
from rmtp.training.config import TrainConfig
from rmtp.training.pieces import (
    augment_batch,
    elastic_net,
    lr_at,
    param_groups,
    penalized_weights,
    training_loss,
    zero_masks,
)
from rmtp.training.state import ResumableShuffle, SkippingSampler, TrainState, rng_states, set_rng_states


@dataclass
class EpochStats:
    """What one epoch did. ``val_top1`` is in percent (as :func:`rmtp.measure.top1`), None on
    unlabeled data, where ``val_agreement`` is the top-1 agreement with the teacher (percent;
    None without val images); ``lr`` is the last step's; ``steps`` the optimizer steps of the whole
    run so far; ``stopped`` says why a run ended before its epochs were done (``max_steps`` or
    ``max_minutes``), on the last epoch."""

    epoch: int
    train_loss: float
    val_top1: float | None
    lr: float
    seconds: float
    steps: int = 0
    val_agreement: float | None = None
    stopped: str | None = None


@dataclass
class TrainResult:
    """A whole run: one :class:`EpochStats` per epoch, the last val top-1 (percent; None on
    unlabeled data), wall seconds, the optimizer steps taken and why it stopped early (``max_steps``,
    ``max_minutes``; None when it did all its epochs)."""

    history: list[EpochStats] = field(default_factory=list)
    final_val_top1: float | None = 0.0
    seconds: float = 0.0
    steps: int = 0
    stopped: str | None = None


@dataclass
class BatchProgress:
    """What ``on_batch`` hears after every optimizer step: where the epoch is and how fast it goes."""

    epoch: int
    epochs: int
    step: int  # optimizer step within the epoch, 1-based
    steps: int  # optimizer steps in the epoch
    images: int  # images this process trained on in the epoch so far
    seconds: float  # wall time of the epoch so far
    loss: float
    lr: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float:
        """Time left in this epoch at the pace so far."""
        return self.seconds / self.step * (self.steps - self.step) if self.step else 0.0


def check_device_settings(config: TrainConfig, device: torch.device) -> None:
    """Refuse, in one line, settings this device cannot run (fp16 autocast, pinned memory off CUDA)."""
    check_precision(config.precision, device, option="finetune.precision")


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
    on_batch: Callable[[BatchProgress], None] | None = None,
    resume: TrainState | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
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

    Under ``torchrun`` (a process group is initialised, see :mod:`rmtp.run.distributed`) the model is
    wrapped in DistributedDataParallel and each process sees its share of every epoch through a
    DistributedSampler; ``batch_size`` stays the *global* batch (split evenly over processes),
    so a recipe means the same optimisation on 1 or N processes. Reported losses are averaged
    over all processes.

    ``on_batch(progress)`` is called after every optimizer step, ``on_epoch(stats)`` after every
    epoch's evaluation. ``on_checkpoint(state)`` receives a :class:`TrainState` after every
    ``config.checkpoint_every`` optimizer steps and at each epoch's end (the caller saves it with
    the weights); passing it back as ``resume`` (with the model holding those weights) continues
    the run from there.

    Raises :class:`RmtpError` if ``config.distill`` is set without a ``teacher``, if the data is
    unlabeled and the config needs labels (:meth:`TrainConfig.unlabeled_problems`), if a
    ``keep_zeros`` name is not a weighted submodule, if the train split is empty, if the device
    cannot run the precision, or if the loss stops being finite.
    """
    if not bundle.labeled:
        for key, why in config.unlabeled_problems()[:1]:
            raise RmtpError(f"finetune.{key}: {why}")
    if config.distill is not None and teacher is None:
        raise RmtpError("finetune.distill is set but there is no teacher model to distil from")
    device = torch.device(device)
    check_device_settings(config, device)
    seed = resume.seed if resume is not None else _run_seed(config)
    world = distributed.world_size()
    loader, shuffle = _train_loader(bundle, config, seed, world)
    val_loader = bundle.loader("val")
    batches_per_epoch = len(loader)
    if batches_per_epoch == 0:
        raise RmtpError("training: the train split is empty")
    steps_per_epoch = math.ceil(batches_per_epoch / config.accumulate)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup_steps = min(total_steps, round(config.warmup_epochs * steps_per_epoch))
    aug_generator = torch.Generator().manual_seed(seed + 1)

    was_training = model.training
    model.to(device)
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None and config.distill is not None:
        teacher.to(device).eval()
    else:
        teacher = None  # distill unset: a teacher passed anyway is not used
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    run = _prepare_steps(model, teacher, config, device, world, keep_zeros, penalize, aug_generator,
                         total_steps, warmup_steps, bundle.num_classes)
    run.seed = seed
    run.budget = config.max_minutes * 60 if config.max_minutes is not None else None
    run.clock_start = time.perf_counter() - (resume.seconds if resume is not None else 0.0)

    result = TrainResult()
    first_epoch = 1
    if resume is not None:
        first_epoch = _restore(run, resume, shuffle, loader, result)
    started = time.perf_counter()
    try:
        for epoch in range(first_epoch, config.epochs + 1):
            epoch_start = time.perf_counter()
            train_loss = _train_epoch(run, model, loader, shuffle, epoch, result, on_batch, on_checkpoint)
            val_top1, val_agreement = _validate(model, teacher, bundle, val_loader, device, config)
            if run.stopped is None and run.step >= total_steps and total_steps < steps_per_epoch * config.epochs:
                run.stopped = "max_steps"
            if run.stopped is None and run.budget is not None and epoch < config.epochs \
                    and _elapsed(run) >= run.budget:
                run.stopped = "max_minutes"  # spent at an epoch's end: no empty epoch after it
            stats = EpochStats(epoch=epoch, train_loss=train_loss, val_top1=val_top1,
                               lr=run.lr, seconds=time.perf_counter() - epoch_start, steps=run.step,
                               val_agreement=val_agreement, stopped=run.stopped)
            result.history.append(stats)
            if on_epoch is not None:
                on_epoch(stats)
            if run.step >= total_steps or run.stopped is not None:
                break  # max_steps or max_minutes reached
            if on_checkpoint is not None and epoch < config.epochs:
                on_checkpoint(_state(run, epoch + 1, 0, result, shuffle_state=_shuffle_generator(loader).get_state()))
    finally:
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_was_training)
    result.final_val_top1 = result.history[-1].val_top1
    result.seconds = time.perf_counter() - started
    result.steps, result.stopped = run.step, run.stopped
    return result


def _validate(model: nn.Module, teacher: nn.Module | None, bundle: DataBundle, val_loader: DataLoader,
              device: torch.device, config: TrainConfig) -> tuple[float | None, float | None]:
    """(val top-1, None) on labelled data; (None, top-1 agreement with the teacher) on unlabeled data
    (None too without val images or a teacher): a fake top-1 of images without labels is never given."""
    if bundle.labeled:
        return top1(model, val_loader, device=device, precision=config.precision), None
    if teacher is None or len(bundle.val) == 0:
        return None, None
    return None, agreement(model, teacher, val_loader, device=device, precision=config.precision)


def _elapsed(run: _Steps) -> float:
    """Wall seconds of the fine-tune so far (a resumed run's earlier part included): rank 0's clock
    under torchrun, so every process stops at the same step."""
    seconds = time.perf_counter() - run.clock_start
    if distributed.world_size() > 1:
        seconds = distributed.all_reduce_sum([seconds if distributed.is_main_process() else 0.0], run.device)[0]
    return seconds


def _run_seed(config: TrainConfig) -> int:
    """The seed of the run's shuffle and augmentation. With ``config.seed`` torch is seeded too
    (init-independent randomness: dropout), so the run repeats; without it a seed is drawn from
    torch's current state, so two unseeded runs differ but each still shuffles consistently."""
    if config.seed is not None:
        torch.manual_seed(config.seed)
        if config.mixup is not None:  # timm's Mixup draws from NumPy's global generator
            import numpy as np

            np.random.seed(config.seed)
    return config.seed if config.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))


def _train_loader(bundle: DataBundle, config: TrainConfig, seed: int,
                  world: int) -> tuple[DataLoader, ResumableShuffle | SkippingSampler]:
    """The shuffled train loader (seeded by ``seed``) and its sampler, which can skip the part of
    an epoch a resumed run already trained on.

    ``batch_size`` is the *global* batch: with ``world`` processes each gets its share of every
    epoch through a DistributedSampler and batches of ``global / world``, so a recipe means the
    same optimisation on 1 or N processes (which is why it must split evenly). On one process the
    order is exactly ``DataLoader(shuffle=True, generator=Generator().manual_seed(seed))``'s.
    """
    global_batch = config.batch_size or bundle.batch_size
    if global_batch % world:
        raise RmtpError(f"finetune.batch_size {global_batch} does not split evenly over {world} processes")
    workers = bundle.num_workers if config.num_workers is None else config.num_workers
    if config.persistent_workers and workers == 0:
        raise RmtpError("finetune.persistent_workers needs workers (finetune.num_workers or data.num_workers > 0)")
    generator = torch.Generator().manual_seed(seed)
    if world > 1:
        sampler: ResumableShuffle | SkippingSampler = SkippingSampler(DistributedSampler(
            bundle.train, num_replicas=world, rank=distributed.rank(), shuffle=True, seed=seed))
    else:
        sampler = ResumableShuffle(bundle.train, generator)
    dataset = bundle.train_with(config.augment) if isinstance(config.augment, TrainAugment) else bundle.train
    loader = DataLoader(dataset, batch_size=global_batch // world, sampler=sampler, generator=generator,
                        num_workers=workers, pin_memory=config.pin_memory,
                        persistent_workers=config.persistent_workers, drop_last=config.mixup is not None)
    return loader, sampler


def _shuffle_generator(loader: DataLoader) -> torch.Generator:
    return loader.generator


@dataclass
class _Steps:
    """What every optimizer step of one run shares, and where the run is in its schedule.

    ``step`` counts optimizer steps across epochs (the lr schedule spans the whole run); ``lr``
    is the last step's learning rate, which :class:`EpochStats` reports.
    """

    config: TrainConfig
    device: torch.device
    #: The model, or its DistributedDataParallel wrapper under torchrun (which averages
    #: gradients), compiled when the config says so.
    forward: nn.Module
    ddp: DistributedDataParallel | None
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    mixup: Callable | None
    #: Every trainable parameter, clipped together by ``grad_clip``.
    params: list[nn.Parameter]
    masks: list[tuple[nn.Parameter, torch.Tensor]]
    mask_layers: list[str]
    penalized: list[nn.Parameter]
    aug_generator: torch.Generator
    total_steps: int
    warmup_steps: int
    seed: int = 0
    step: int = 0
    lr: float = 0.0
    loss_sum: float = 0.0  # of the epoch in progress, this process
    seen: int = 0
    budget: float | None = None  # max_minutes in seconds
    clock_start: float = 0.0  # perf_counter() when the fine-tune began (earlier on a resume)
    elapsed: float = 0.0  # seconds of the fine-tune at the current step (with a budget)
    stopped: str | None = None  # max_steps / max_minutes, once the run stopped early

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.config.precision, self.device)


def _prepare_steps(model: nn.Module, teacher: nn.Module | None, config: TrainConfig, device: torch.device,
                   world: int, keep_zeros: Sequence[str], penalize: Sequence[str], aug_generator: torch.Generator,
                   total_steps: int, warmup_steps: int, num_classes: int) -> _Steps:
    """Masks, penalised weights, the DDP wrapper, compile, AdamW, the GradScaler and Mixup for a
    model already on ``device``.

    The keep-zeros masks are taken now, before any step, so they record the pruner's zeros only.
    """
    masks = [(p, m.to(device)) for p, m in zero_masks(model, keep_zeros)]
    penalized = penalized_weights(model, penalize)
    ddp = DistributedDataParallel(model) if world > 1 else None
    forward: nn.Module = ddp if ddp is not None else model
    if config.compile:
        forward = torch.compile(forward)
    groups = param_groups(model, config.weight_decay)
    if not groups:
        raise RmtpError("training: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    params = [p for g in groups for p in g["params"]]
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    mixup = None
    if config.mixup is not None:
        from timm.data import Mixup

        m = config.mixup
        mixup = Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob, switch_prob=m.switch_prob,
                      mode=m.mode, label_smoothing=config.label_smoothing, num_classes=num_classes)
    return _Steps(config=config, device=device, forward=forward, ddp=ddp, teacher=teacher, optimizer=optimizer,
                  scaler=scaler, mixup=mixup, params=params, masks=masks, mask_layers=list(keep_zeros),
                  penalized=penalized,
                  aug_generator=aug_generator, total_steps=total_steps, warmup_steps=warmup_steps, lr=config.lr)


def _state(run: _Steps, epoch: int, batches_done: int, result: TrainResult, *,
           shuffle_state: torch.Tensor) -> TrainState:
    return TrainState(seed=run.seed, epoch=epoch, batches_done=batches_done, step=run.step, shuffle=shuffle_state,
                      augment=run.aug_generator.get_state(), loss_sum=run.loss_sum if batches_done else 0.0,
                      seen=run.seen if batches_done else 0, history=[vars(s).copy() for s in result.history],
                      optimizer=run.optimizer.state_dict(),
                      scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
                      masks=[mask.bool().cpu() for _, mask in run.masks], mask_layers=list(run.mask_layers),
                      rng=rng_states(), seconds=time.perf_counter() - run.clock_start)


def _restore(run: _Steps, state: TrainState, sampler: ResumableShuffle | SkippingSampler, loader: DataLoader,
             result: TrainResult) -> int:
    """Put the run where ``state`` says (the model already holds its weights); the epoch to start."""
    if len(state.masks) != len(run.masks):
        raise RmtpError(f"resume: the checkpoint has {len(state.masks)} keep-zeros masks, the model {len(run.masks)}")
    for (_param, mask), saved in zip(run.masks, state.masks):
        if saved.shape != mask.shape:
            raise RmtpError("resume: a keep-zeros mask of the checkpoint does not fit the model")
        mask.copy_(saved.to(mask))
    run.optimizer.load_state_dict(state.optimizer)
    if state.scaler is not None:
        run.scaler.load_state_dict(state.scaler)
    run.step = state.step
    run.aug_generator.set_state(state.augment)
    _shuffle_generator(loader).set_state(state.shuffle)
    run.loss_sum, run.seen = state.loss_sum, state.seen
    sampler.skip = state.batches_done * (loader.batch_size or 1)
    result.history.extend(EpochStats(**stats) for stats in state.history)
    set_rng_states(state.rng)
    return state.epoch


def _train_epoch(run: _Steps, model: nn.Module, loader: DataLoader, sampler: ResumableShuffle | SkippingSampler,
                 epoch: int, result: TrainResult, on_batch: Callable[[BatchProgress], None] | None,
                 on_checkpoint: Callable[[TrainState], None] | None) -> float:
    """One pass over the train split in train mode; the mean train loss over all processes.

    ``sampler.set_epoch`` reshuffles each process's shard differently every epoch (the same way
    on every process, so the shards stay disjoint). A resumed epoch starts after the batches its
    checkpoint had done (``sampler.skip``), with the loss so far carried over.
    """
    model.train()
    if not isinstance(sampler, ResumableShuffle):  # a DistributedSampler reshuffles per epoch
        sampler.set_epoch(epoch)
    done = sampler.skip // (loader.batch_size or 1)
    if not done:
        run.loss_sum, run.seen = 0.0, 0
    shuffle_state = _shuffle_generator(loader).get_state()  # before the iterator draws this epoch's order
    batches = done + len(loader)
    accumulate = run.config.accumulate
    steps = math.ceil(batches / accumulate)
    started, images_seen = time.perf_counter(), 0
    group: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch_index, (images, targets) in enumerate(loader, start=done + 1):
        group.append((images, targets))
        if len(group) < accumulate and batch_index < batches:
            continue
        if run.step >= run.total_steps:
            break  # max_steps reached mid-epoch
        if run.budget is not None:
            run.elapsed = _elapsed(run)
            if images_seen and run.elapsed >= run.budget:  # an epoch begun takes one step at least
                run.stopped = "max_minutes"
                break
        loss = _train_step(run, group, epoch, batch_index)
        images_seen += sum(t.shape[0] for _, t in group)
        group = []
        if on_batch is not None:
            on_batch(BatchProgress(epoch=epoch, epochs=run.config.epochs, step=math.ceil(batch_index / accumulate),
                                   steps=steps, images=images_seen, seconds=time.perf_counter() - started,
                                   loss=float(loss.detach()), lr=run.lr))
        every = run.config.checkpoint_every
        if on_checkpoint is not None and every and run.step % every == 0 and batch_index < batches:
            on_checkpoint(_state(run, epoch, batch_index, result, shuffle_state=shuffle_state))
    loss_sum, seen = distributed.all_reduce_sum([run.loss_sum, float(run.seen)], run.device)
    return loss_sum / max(1, seen)


def _train_step(run: _Steps, group: list[tuple[torch.Tensor, torch.Tensor]], epoch: int,
                batch_index: int) -> torch.Tensor:
    """One optimizer step on ``group`` (``accumulate`` batches, fewer at an epoch's end); returns
    the loss (penalty included) of its last batch.

    The lr is set from the schedule before the step. Each batch's loss is divided by the group
    size, so the summed gradients are those of the group's mean. Gradients of masked entries are
    zeroed before clipping (so they neither count in the norm nor feed AdamW's moments) and the
    weights are re-masked after the step, so pruned zeros stay exactly zero (see :func:`train`).
    """
    config = run.config
    run.lr = lr_at(run.step, total_steps=run.total_steps, warmup_steps=run.warmup_steps,
                   lr=config.lr, min_lr_ratio=config.min_lr_ratio,
                   time_fraction=run.elapsed / run.budget if run.budget is not None else None)
    for param_group in run.optimizer.param_groups:
        param_group["lr"] = run.lr
    run.optimizer.zero_grad(set_to_none=True)
    for index, (images, targets) in enumerate(group):
        last = index == len(group) - 1
        sync = contextlib.nullcontext() if last or run.ddp is None else run.ddp.no_sync()
        with sync:
            loss = _forward_backward(run, images, targets, len(group), epoch, batch_index)
        run.loss_sum += float(loss.detach()) * targets.shape[0]
        run.seen += targets.shape[0]
    run.scaler.unscale_(run.optimizer)
    for param, mask in run.masks:
        if param.grad is not None:
            param.grad.mul_(mask)
    if config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(run.params, config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    with torch.no_grad():
        for param, mask in run.masks:
            param.mul_(mask)
    run.step += 1
    return loss


def _forward_backward(run: _Steps, images: torch.Tensor, targets: torch.Tensor, group_size: int, epoch: int,
                      batch_index: int) -> torch.Tensor:
    """Forward (teacher too, under autocast), loss in fp32, backward of ``loss / group_size``."""
    config = run.config
    images, targets = images.to(run.device, non_blocking=True), targets.to(run.device, non_blocking=True)
    if config.augment is True:  # the shift; timm's augmentation is in the train split's transform
        images = augment_batch(images, run.aug_generator)
    if run.mixup is not None:
        images, targets = run.mixup(images, targets)
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    teacher_logits = None
    with run.autocast():
        if run.teacher is not None:
            with torch.no_grad():
                teacher_logits = run.teacher(images)
        logits = run.forward(images)
    if config.precision != "fp32":
        logits = logits.float()
        teacher_logits = teacher_logits.float() if teacher_logits is not None else None
    loss = training_loss(logits, targets, teacher_logits, config)
    penalty = elastic_net(run.penalized, config.l1, config.l2)
    if penalty is not None:
        loss = loss + penalty
    if not torch.isfinite(loss):
        raise RmtpError(f"training diverged: loss is {loss.item()} at epoch {epoch}, "
                        f"step {batch_index} (lower lr or set grad_clip)")
    run.scaler.scale(loss / group_size if group_size > 1 else loss).backward()
    return loss
