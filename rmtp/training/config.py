"""What a fine-tune (or a reference model's training) is told to do: the ``finetune:`` step's keys.

Validated with pydantic before any model is built, like every part of a recipe; the device-bound
checks (fp16 needs CUDA) run again where the device is known (:func:`rmtp.training.train`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rmtp.data.augment import TrainAugment
from rmtp.run.precision import Precision

#: Largest shift, in pixels, of the ``augment`` random translation.
AUGMENT_SHIFT = 2



class MixupConfig(BaseModel):
    """``finetune.mixup``: timm's :class:`timm.data.Mixup` on each train batch (soft targets,
    label smoothing folded in). Needs even batches: the train loader drops a ragged last one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mixup_alpha: float = Field(0.8, ge=0.0, le=100.0, description="Beta(α, α) of mixup (0: off)")
    cutmix_alpha: float = Field(0.0, ge=0.0, le=100.0, description="Beta(α, α) of cutmix (0: off)")
    prob: float = Field(1.0, ge=0.0, le=1.0, description="chance a batch is mixed at all")
    switch_prob: float = Field(0.5, ge=0.0, le=1.0, description="with both on: chance of cutmix instead of mixup")
    mode: Literal["batch", "pair", "elem"] = Field("batch", description="one mix per batch, pair or element")

    @model_validator(mode="after")
    def _something_mixes(self) -> MixupConfig:
        if self.mixup_alpha == 0.0 and self.cutmix_alpha == 0.0:
            raise ValueError("mixup: set mixup_alpha or cutmix_alpha above 0 (or drop mixup)")
        return self


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
    augment: bool | TrainAugment = Field(False, description=f"true: random translation by up to ±{AUGMENT_SHIFT} "
                                                            "px (pad + random crop of each batch, seeded; digits); "
                                                            "timm (or a mapping of its keys: auto_augment, re_prob, "
                                                            "hflip, ...): timm's training transform (imagefolder)")

    @field_validator("augment", mode="before")
    @classmethod
    def _timm_augment(cls, value: Any) -> Any:
        if value == "timm":
            return TrainAugment()
        if isinstance(value, str):
            raise ValueError(f"augment takes true/false (shift), timm, or a mapping of timm's keys; got {value!r}")
        return value
    seed: int | None = Field(None, ge=0, description="seed of init-independent randomness: shuffle, "
                                                     "augmentation, dropout (None: not seeded)")
    precision: Precision = Field("fp32", description="autocast dtype of forward passes: fp32 (off), bf16 "
                                                     "(CPU and CUDA), fp16 (CUDA only, with a GradScaler)")
    channels_last: bool = Field(False, description="student, teacher and images in torch.channels_last")
    accumulate: int = Field(1, ge=1, le=4096, description="batches per optimizer step (gradients summed; "
                                                          "the lr schedule counts optimizer steps)")
    mixup: MixupConfig | None = Field(None, description="timm Mixup/CutMix on each train batch")
    compile: bool = Field(False, description="torch.compile the student's forward (first steps are slow)")
    num_workers: int | None = Field(None, ge=0, le=256, description="train loader workers (None: data.num_workers)")
    pin_memory: bool = Field(False, description="pinned host memory for the train loader (faster copies to CUDA)")
    persistent_workers: bool = Field(False, description="keep train loader workers alive between epochs")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps in all (the lr "
                                                          "schedule is fitted to them): smoke runs of big recipes")
    max_minutes: float | None = Field(None, gt=0, le=1_000_000,
                                      description="wall-clock budget of the fine-tune (training and its epoch-end "
                                                  "evaluations): stop at the first optimizer step past it (one "
                                                  "step at least), the cosine decayed by whichever of steps and "
                                                  "minutes is nearer its end; a resumed run gets the minutes left")
    checkpoint_every: int | None = Field(None, ge=1, description="with an output folder: also checkpoint every "
                                                                 "this many optimizer steps (always at each "
                                                                 "epoch end), for --resume")

    @model_validator(mode="after")
    def _loader_settings(self) -> TrainConfig:
        if self.persistent_workers and self.num_workers == 0:
            raise ValueError("persistent_workers needs num_workers > 0")
        return self

    def unlabeled_problems(self) -> list[tuple[str, str]]:
        """(key, why) for each setting that needs labels, which unlabeled data (``data.unlabeled``)
        does not have: only distillation alone trains on it (``distill: {weight: 1.0}``). Empty when
        the fine-tune can run on unlabeled images. Callers prefix the key (``steps[2].finetune.``)."""
        where = "the data is unlabeled (data.unlabeled: true)"
        problems = []
        if self.distill is None:
            problems.append(("distill", f"not set, and {where}: a fine-tune on unlabeled images can only distil "
                                        f"from the dense model; set distill: {{weight: 1.0}} (KD alone, no "
                                        f"cross-entropy)"))
        elif self.distill.weight != 1.0:
            problems.append(("distill.weight", f"{self.distill.weight:g} keeps {1 - self.distill.weight:g} of "
                                               f"cross-entropy on labels, and {where}; set weight: 1.0 (KD alone)"))
        if self.mixup is not None:
            problems.append(("mixup", f"mixes labels, and {where}; remove mixup"))
        return problems


class ReconstructConfig(BaseModel):
    """A ``reconstruct:`` step's settings (also ``rmtp.reconstruct(...)``'s keywords): block-wise
    reconstruction, :mod:`rmtp.fidelity.blockwise`. Here, torch-free, so a recipe validates without torch."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(200, ge=1, le=1_000_000, description="optimizer steps per block")
    max_minutes: float | None = Field(None, gt=0, description="wall-clock budget of the whole step, shared "
                                                              "equally by the blocks (a block stops early when "
                                                              "its share is spent); null: steps only")
    lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate, cosine-decayed to 0 over a block's steps")
    batch_size: int = Field(32, ge=1, le=4096, description="calibration images per optimizer step")
    images: int | None = Field(None, ge=1, description="use at most this many calibration images (null: all)")
    seed: int | None = Field(None, ge=0, description="mini-batch draws (null: the recipe's seed + step index)")
