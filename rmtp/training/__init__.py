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

from rmtp.lazy import lazy_exports

# Lazy, so that recipes (which need only the config) validate without importing torch.
_EXPORTS = {
    **dict.fromkeys(("AUGMENT_SHIFT", "DistillConfig", "MixupConfig", "TrainConfig"), "rmtp.training.config"),
    "Precision": "rmtp.run.precision",
    **dict.fromkeys(("BatchProgress", "EpochStats", "TrainResult", "check_device_settings", "train"),
                    "rmtp.training.loop"),
    **dict.fromkeys(("NO_DECAY_TOKENS", "augment_batch", "elastic_net", "kd_loss", "lr_at", "param_groups",
                     "penalized_weights", "training_loss", "zero_masks"), "rmtp.training.pieces"),
    **dict.fromkeys(("ResumableShuffle", "TrainState"), "rmtp.training.state"),
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
