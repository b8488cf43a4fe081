"""``SvdMpParams``, the params of ``svd-mp`` (:mod:`rmtp_plugins.svd_mp`): plain pydantic, no torch,
so that ``rmtp list`` and ``rmtp validate`` load none."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rmtp.contract.param_types import TwConfidence, target_latency_ms_field, target_speedup_field
from rmtp.contract.pruner import PrunerParams


class SvdMpParams(PrunerParams):
    margin: float = Field(1.0, gt=0.0, le=100.0,
                          description="scale on the MP singular-value threshold s₊ (above 1 keeps fewer directions)")
    min_rank: int = Field(1, ge=1, description="never keep fewer directions per matrix")
    max_rank_fraction: float = Field(1.0, gt=0.0, le=1.0, description="never keep more than this share of min(M,N)")
    target_params: float | None = Field(None, gt=0.0, lt=1.0,
                                        description="keep this share of the selected layers' dense weights "
                                                    "(split layers count at their original size), ranks "
                                                    "allocated globally by s/s₊ (default: each layer's own edge)")
    split_qkv: bool = Field(True, description="fit and factor a fused qkv as separate q, k, v blocks")
    coefficient_pruning: float = Field(0.0, ge=0.0, lt=1.0,
                                       description="then zero this share of the smallest entries of the new weights")
    when_split_does_not_pay: Literal["reconstruct", "keep"] | None = Field(
        None, description="a layer whose split would not save params: write back its rank-k "
                          "reconstruction, or keep it unchanged (default: reconstruct on the raw weights, "
                          "keep when whitening, where a rank-k dense layer only adds output error)")
    alpha: float = Field(0.25, gt=0.0, lt=0.5, description="BEMA fit on the [alpha, 1-alpha] quantile band")
    tw_confidence: TwConfidence = Field(None,
                                        description="add a Tracy–Widom margin to the edge at this confidence")
    min_dim: int = Field(32, ge=2, description="matrices with min(M,N) below this are skipped (too few "
                                                "singular values for statistics)")
    only_if_faster: bool | None = Field(None, description="leave a layer dense when its split is not faster on "
                                                          "the target (the step's latency:); default on, off "
                                                          "under target_params (a params budget)")
    target_speedup: float | None = target_speedup_field("ranks (best s/s₊ first)")
    target_latency_ms: float | None = target_latency_ms_field()
    allocation: Literal["global", "uniform", "sensitivity"] = Field(
        "global", description="with target_params: rank by score across all selected layers (global), "
                              "every matrix keeps target_params of its own weights (uniform), or each layer's "
                              "share of its weights chosen for the least summed change of the predictions on "
                              "calibration images, each layer's cut measured alone (sensitivity: ASVD's "
                              "measurement; needs calibration data; 9 passes per layer, minutes)")
    sensitivity_images: int = Field(64, ge=1, description="allocation: sensitivity: calibration images each "
                                                          "layer's truncation is scored on")
    whiten: bool | None = Field(
        None, description="choose and write the factors on the activation-whitened matrix W·S (S·Sᵀ = "
                          "E[x·xᵀ] of the layer's calibration inputs), so a cut removes the least output "
                          "error on real inputs: default on when calibration data is passed "
                          "(rmtp.prune(..., calibration=)); a recipe step whitens only with true, which "
                          "loads its data's calibration images; false: never")
    sequential: bool = Field(
        False, description="when whitening: fit layer by layer, each layer whitened by its inputs in the "
                           "model compressed so far (one partial forward pass per layer, ~10× the time); "
                           "default: one pass over the model as it came, which scored as well on a real "
                           "ViT-Ti (docs/spectral.md)")

    @model_validator(mode="after")
    def _one_budget(self) -> SvdMpParams:
        budgets = [k for k in ("target_params", "target_speedup", "target_latency_ms")
                   if getattr(self, k) is not None]
        if len(budgets) > 1:
            raise ValueError(f"give one budget, not {' and '.join(budgets)}")
        if self.only_if_faster is False and budgets and budgets[0] != "target_params":
            raise ValueError(f"{budgets[0]} splits only layers that are faster; drop only_if_faster: false")
        if self.allocation != "global" and self.target_params is None:
            raise ValueError(f"allocation: {self.allocation} shares target_params across the layers; give "
                             f"target_params")
        if self.allocation == "sensitivity" and self.only_if_faster:
            raise ValueError("allocation: sensitivity chooses each layer's ranks by their measured effect, and "
                             "only_if_faster would change them after; drop only_if_faster")
        if self.allocation == "sensitivity" and self.whiten is False:
            raise ValueError("allocation: sensitivity measures each layer on calibration images and fits the "
                             "whitened factors; drop whiten: false")
        return self

    def faster_only(self) -> bool:
        """Whether a split must be faster on the target (``only_if_faster``, resolved)."""
        if self.only_if_faster is not None:
            return self.only_if_faster
        return self.target_params is None


__all__ = ["SvdMpParams"]
