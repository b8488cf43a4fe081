"""Training and fine-tuning: the one loop rmtp trains a reference model, fine-tunes a pruned one
and distils with.

* :mod:`.config`: ``TrainConfig`` (a recipe's ``finetune:`` keys), ``DistillConfig``, ``MixupConfig``.
* :mod:`.pieces`: the lr schedule, the losses, the shift augmentation, AdamW's groups, the
  elastic-net penalty and the keep-zeros masks, each testable alone.
* :mod:`.loop`: :func:`train` (precision, accumulation, compile, DDP, checkpoints and resume).
* :mod:`.state`: :class:`TrainState`, what a checkpoint holds besides the weights, and the
  resumable shuffle.
"""

from __future__ import annotations

from rmtp.training.config import AUGMENT_SHIFT, DistillConfig, MixupConfig, Precision, TrainConfig
from rmtp.training.loop import BatchProgress, EpochStats, TrainResult, check_device_settings, train
from rmtp.training.pieces import (
    NO_DECAY_TOKENS,
    augment_batch,
    elastic_net,
    kd_loss,
    lr_at,
    param_groups,
    penalized_weights,
    training_loss,
    zero_masks,
)
from rmtp.training.state import ResumableShuffle, TrainState

__all__ = ["AUGMENT_SHIFT", "NO_DECAY_TOKENS", "BatchProgress", "DistillConfig", "EpochStats", "MixupConfig",
           "Precision", "ResumableShuffle", "TrainConfig", "TrainResult", "TrainState", "augment_batch",
           "check_device_settings", "elastic_net", "kd_loss", "lr_at", "param_groups", "penalized_weights",
           "train", "training_loss", "zero_masks"]
