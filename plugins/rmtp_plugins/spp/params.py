"""The ``spp`` pruner's params: plain pydantic, no torch, so that ``rmtp list`` and ``rmtp validate``
load none (the search itself is :mod:`.pruner`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from rmtp.contract.param_types import target_latency_ms_field, target_speedup_field
from rmtp.contract.pruner import PrunerParams

if TYPE_CHECKING:
    from rmtp_plugins.spp.path import LbiSettings


#: The params that matter only with the LBI search (its iteration, and folding its gates); `search: obs` refuses them.
LBI_ONLY = frozenset({"kappa", "lam", "nu", "lr", "steps", "batch_size", "loss", "fold_gates"})


class SppParams(PrunerParams):
    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="share to remove (see target); or use ratios")
    ratios: tuple[float, ...] | None = Field(
        None, min_length=1, description="several shares from one search, each saved as <output>/spp-<ratio>/")
    keep: float | None = Field(None, gt=0.0, lt=1.0,
                               description="with ratios: the one later steps continue with (default: the first)")
    target: Literal["params", "groups"] = Field(
        "params", description="ratio of the gated branches' params, or of the number of groups")
    structures: tuple[Literal["heads", "neurons", "channels"], ...] = Field(
        ("heads", "neurons", "channels"), min_length=1,
        description="which groups to gate: attention heads, MLP neurons (ViT, ConvNeXt), ResNet inner channels")
    kappa: float = Field(1.0, gt=0.0, le=1e3, description="κ: damping of the gate step, scale of Γ")
    lam: float = Field(2.0, gt=0.0, le=1e6, description="λ: threshold of Γ = κ·soft(Z, λ); λ·κ ≥ 1 keeps "
                                                         "groups the loss ignores out of the path")
    nu: float = Field(10.0, gt=0.0, le=1e6, description="ν: coupling ‖γ − Γ‖²/(2ν) (smaller pulls gates harder)")
    lr: float = Field(0.5, gt=0.0, le=100.0, description="α: step size of the iteration")
    steps: int = Field(200, ge=1, le=1_000_000, description="iterations (one calibration batch each)")
    batch_size: int = Field(64, ge=1, le=65_536, description="calibration images per iteration")
    loss: Literal["ce", "kd"] = Field("ce", description="task loss: cross-entropy on the labels, or KL to "
                                                        "the dense model's logits (temperature 1)")
    target_speedup: float | None = target_speedup_field("the least-removing level of the path (instead of ratio)")
    target_latency_ms: float | None = target_latency_ms_field()
    fold_gates: bool = Field(False, description="fold the searched gates of kept groups into the weights "
                                                "(else kept groups keep their dense weights, gate 1)")
    search: Literal["lbi", "obs"] = Field(
        "lbi", description="lbi: the split-LBI gate path driven by the task loss; obs: no training, each unit "
                           "cut by structured OBS on its consumer's calibration inputs, layer by layer, and the "
                           "consumer refitted by least squares (holds on pretrained models zero-shot)")
    percdamp: float = Field(0.01, ge=0.0, le=1.0,
                            description="search: obs: damping of the inputs' Hessian, share of its mean diagonal")

    @model_validator(mode="after")
    def _consistent(self) -> SppParams:
        given = [k for k in ("ratio", "ratios", "target_speedup", "target_latency_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of ratio (one sparsity level), ratios (a list), target_speedup or "
                             f"target_latency_ms (a speed budget){f'; got {given}' if given else ''}")
        if self.ratios is not None:
            bad = [r for r in self.ratios if not 0.0 < r < 1.0]
            if bad:
                raise ValueError(f"ratios must lie in (0, 1), got {bad}")
            if len(set(self.ratios)) != len(self.ratios):
                raise ValueError(f"ratios has duplicates: {list(self.ratios)}")
        if self.keep is not None and self.keep not in self.levels():
            raise ValueError(f"keep={self.keep} is not one of the ratios {list(self.levels())}")
        if len(set(self.structures)) != len(self.structures):
            raise ValueError(f"structures has duplicates: {list(self.structures)}")
        if self.search == "obs":
            lbi_only = sorted(LBI_ONLY & self.model_fields_set)
            if lbi_only:
                raise ValueError(f"{', '.join(lbi_only)} set the LBI gate search, which search: obs does not "
                                 f"run (obs chooses by output error and refits; drop them or use search: lbi)")
        else:
            if "percdamp" in self.model_fields_set:
                raise ValueError("percdamp sets search: obs; the LBI search does not use it")
        return self

    def levels(self) -> tuple[float, ...]:
        """The ratios to slice (a speed target's ratio is chosen when the step runs)."""
        if self.ratios is not None:
            return self.ratios
        return (self.ratio,) if self.ratio is not None else ()

    def speed_target_set(self) -> bool:
        return self.target_speedup is not None or self.target_latency_ms is not None

    def kept_level(self) -> float:
        return self.keep if self.keep is not None else self.levels()[0]

    def settings(self) -> LbiSettings:
        from rmtp_plugins.spp.path import LbiSettings

        return LbiSettings(kappa=self.kappa, lam=self.lam, nu=self.nu, lr=self.lr, steps=self.steps)
