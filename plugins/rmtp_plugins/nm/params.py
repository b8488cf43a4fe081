"""The ``n:m`` pruner's params and the pattern names (``"2:4"``, ``"dense"``): plain pydantic and
arithmetic, no torch, so that ``rmtp list`` and ``rmtp validate`` load none."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rmtp.contract.param_types import TwConfidence, one_speed_target, target_latency_ms_field, target_speedup_field
from rmtp.contract.pruner import PrunerParams

Pattern = tuple[int, int] | None


def parse_pattern(text: str) -> tuple[int, int] | None:
    """``"2:4"`` → (2, 4); ``"dense"`` → None. Raises ValueError for anything else."""
    text = text.strip()
    if text == "dense":
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"pattern {text!r} is neither 'dense' nor 'N:M' with integers N < M")
    n, m = int(parts[0]), int(parts[1])
    if not 1 <= n < m:
        raise ValueError(f"pattern {text!r} needs 1 <= N < M")
    return n, m


def pattern_name(pattern: tuple[int, int] | None) -> str:
    return "dense" if pattern is None else f"{pattern[0]}:{pattern[1]}"


def pattern_density(pattern: Pattern) -> float:
    """The share of MACs a layer with ``pattern`` costs on sparse kernels (dense: 1)."""
    return 1.0 if pattern is None else pattern[0] / pattern[1]


class NmParams(PrunerParams):
    n: int = Field(2, ge=1, le=1023, description="keep at most n of every m consecutive input weights of a row")
    m: int = Field(4, ge=2, le=1024, description="group size along the input dimension (n < m)")
    score: Literal["magnitude", "wanda", "sparsegpt"] = Field(
        "magnitude", description="weight importance: |w|, or |w|·‖x‖ over the calibration activations (Wanda), "
                                 "or sparsegpt: masks chosen layer by layer with the OBS update of the kept "
                                 "weights on calibration activations (SparseGPT; budget and permutation rank "
                                 "as wanda)")
    percdamp: float = Field(0.01, gt=0.0, le=1.0, description="sparsegpt: Hessian damping, as a share of its "
                                                              "mean diagonal (0.1 before a reconstruct step on "
                                                              "a pretrained model: docs/nm.md)")
    blocksize: int = Field(128, ge=1, le=65536, description="sparsegpt: columns per lazy-update block (rounded "
                                                            "down to a multiple of m)")
    refit: bool = Field(False, description="sparsegpt: then refit each row's kept weights by least squares on the "
                                           "calibration inputs (the optimum for the mask; the sweep is greedy)")
    budget: Literal["mp", "uniform"] = Field(
        "mp", description="mp: patterns per layer from the Marchenko–Pastur signal under target_macs; "
                          "uniform: n:m on every layer")
    target_macs: float = Field(0.6, gt=0.0, le=1.0,
                               description="mp: keep at most this share of the pruned layers' dense MACs "
                                           "(sparse execution: an n:m layer costs n/m)")
    patterns: tuple[str, ...] = Field(("dense",), description="mp: the alternatives to n:m a layer may get "
                                                              "('dense' or 'N:M', e.g. ['dense', '6:8'])")
    z_scale: float = Field(0.5, ge=0.0, le=5.0,
                           description="mp: strength of the MP signal, layer factor exp(z_scale·z); 0: scores only")
    permute: bool = Field(False, description="reorder input channels before masking so strong weights "
                                             "fall into different groups")
    permute_index: bool = Field(True, description="permute layers with no producer to absorb it too, by a "
                                                  "saved index gather before the layer (else leave them)")
    restore: bool = Field(False, description="prune–restore: over-prune, then restore within the pattern the "
                                             "weights that most lower the calibration output error")
    restore_overprune: int = Field(1, ge=1, description="restore: weights per group pruned beyond n first "
                                                        "(at most n)")
    alpha: float = Field(0.25, gt=0.0, lt=0.5, description="mp: MP fit on the [alpha, 1-alpha] quantile band")
    tw_confidence: TwConfidence = Field(None,
                                        description="mp: add a Tracy–Widom margin to the edge at this confidence")
    min_dim: int = Field(32, ge=2, description="mp: matrices with min(M,N) below this get no MP signal (z = 0)")
    only_if_faster: bool = Field(True, description="leave a layer dense when its pattern is not faster on the "
                                                   "target (the step's latency:): on a CPU, or without a 2:4 "
                                                   "kernel, that is every layer; false: prune for MACs only")
    target_speedup: float | None = target_speedup_field("patterns (mp: least damage per time saved)")
    target_latency_ms: float | None = target_latency_ms_field()

    @model_validator(mode="after")
    def _consistent(self) -> NmParams:
        if self.n >= self.m:
            raise ValueError(f"n={self.n} must be smaller than m={self.m}")
        if self.score == "sparsegpt" and self.restore:
            raise ValueError("restore and score: sparsegpt both fit the mask to the calibration error; use one")
        extra = sorted({"percdamp", "blocksize", "refit"} & self.model_fields_set)
        if self.score != "sparsegpt" and extra:
            raise ValueError(f"{', '.join(extra)}: only used with score: sparsegpt")
        if self.restore and self.restore_overprune > self.n:
            raise ValueError(f"restore_overprune={self.restore_overprune} exceeds n={self.n}")
        options = self.options()  # raises for a malformed pattern
        speed = one_speed_target(self)
        if speed and "target_macs" in self.model_fields_set:
            raise ValueError(f"give one budget, not target_macs and {speed[0]}")
        if speed and not self.only_if_faster:
            raise ValueError(f"{speed[0]} keeps only patterns that are faster; drop only_if_faster: false")
        if self.budget == "uniform":
            extra = sorted({"target_macs", "patterns", "z_scale", *speed} & self.model_fields_set)
            if extra:
                raise ValueError(f"{', '.join(extra)}: only used with budget: mp")
            return self
        sparsest = min(options, key=pattern_density)
        if self.target_macs < pattern_density(sparsest) - 1e-12:
            raise ValueError(f"target_macs={self.target_macs} is below the sparsest allowed pattern "
                             f"{pattern_name(sparsest)} ({pattern_density(sparsest):.3g}); add a sparser pattern")
        return self

    def main(self) -> tuple[int, int]:
        return self.n, self.m

    def options(self) -> list[Pattern]:
        """n:m first, then the extra patterns (duplicates dropped)."""
        out: list[Pattern] = [self.main()]
        for text in self.patterns if self.budget == "mp" else ():
            pattern = parse_pattern(text)
            if pattern not in out:
                out.append(pattern)
        return out
