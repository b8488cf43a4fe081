"""A step's speed budget in whole-model time: what ``target_speedup`` / ``target_latency_ms`` mean
and how a pruner's plan is judged against them.

Every speed target is relative to the recipe's **dense** model (``ctx.dense_model``), not to the
model the step receives: in a recipe that prunes weights and then tokens, each step's target is
the speed-up of the whole recipe so far, so the two share one budget (the later step only needs
what the earlier one left). The dense and the current model are timed against each other once;
a pruner then predicts its plan's time as the current time minus its layers' savings
(:func:`rmtp.latency.cost.predicted_seconds`), and reaches the target at the least loss of its
own score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from rmtp.latency.cost import CostModel, interpolate, predicted_seconds
from rmtp.latency.table import LatencyError

if TYPE_CHECKING:
    from torch import nn

    from rmtp.contract.pruner import PruneContext

T = TypeVar("T")

#: In-context scales outside this range are not what caches do to a layer but an error of the
#: measurement (a busy machine): a layer does not take 20 times longer in the model than alone.
SANE_SCALE = (0.25, 4.0)


@dataclass
class SpeedTarget:
    """The dense model's time, the current model's, and the time the step must reach.

    Per-layer savings come from the cost table (layers timed alone); they are counted in the
    model's time through ``scale``: the candidate layers' measured share of the current model
    (:meth:`~rmtp.latency.cost.CostModel.in_context`) over the sum of their dense times alone.
    """

    cost: CostModel
    target_speedup: float | None
    target_latency_ms: float | None
    dense: float = 0.0
    now: float = 0.0
    #: Time the pruned model may take (same unit as ``dense``); None without a target.
    goal: float | None = None
    scale: float = 1.0
    #: What the per-layer figures missed on the plans timed whole by :meth:`correct`: (the plan's
    #: predicted saving in the model, its measured time less the figures' prediction).
    checks: list[tuple[float, float]] = field(default_factory=list)
    #: Why the step keeps another plan than its search chose, or none (:meth:`keep_measured`); ''.
    fallback: str = ""
    #: What went wrong with the measurement itself (a scale out of :data:`SANE_SCALE`), for the report.
    warnings: list[str] = field(default_factory=list)

    def calibrate(self, ctx: PruneContext, names: Sequence[str], isolated: Sequence[float]) -> None:
        """Time the dense model, the current one and the named layers' share of it, together;
        ``isolated``: those layers' dense times alone (from :meth:`CostModel.seconds`)."""
        dense = ctx.dense_model if ctx.dense_model is not None else ctx.model
        with ctx.progress.task(f"latency: timing dense vs current model ({self.cost.kind})"):
            self.dense, self.now, layers = self.cost.in_context(dense, ctx.model, list(names))
        total = sum(isolated)
        self.scale = self._sane(layers / total) if names and total > 0 else 1.0
        if self.target_latency_ms is not None:
            self.goal = self.target_latency_ms / 1e3
            self.target_speedup = self.dense / self.goal
        elif self.target_speedup is not None:
            self.goal = self.dense / self.target_speedup

    def _sane(self, scale: float) -> float:
        """``scale`` if it lies in :data:`SANE_SCALE`; else 1 (the figures as timed alone), and a
        warning saying the measurement failed, rather than a prediction multiplied by noise."""
        low, high = SANE_SCALE
        if low <= scale <= high:
            return scale
        self.warnings.append(f"latency: the timed layers took {scale:.3g}× their time alone inside the model, "
                             f"outside the sane ×{low:g}–×{high:g}: an error of the measurement (a busy "
                             f"machine?), so their figures are used as timed alone")
        return 1.0

    @property
    def start_speedup(self) -> float:
        """The speed-up over dense of the model the step received (1 for the dense model itself)."""
        return self.dense / self.now if self.now > 0 else 1.0

    def _from_figures(self, savings: Sequence[float]) -> tuple[float, float]:
        """(the plan's saving in the model, the model's time by the per-layer figures alone)."""
        saved = self.scale * sum(savings)
        return saved, predicted_seconds(self.now, [saved])

    def miss(self, savings: Sequence[float]) -> float:
        """Time the per-layer figures leave out of the plan with ``savings``: 0 before any check;
        else the misses of the plans timed whole, linear in the plan's saving between them and
        constant beyond (plans timed at one saving count by their mean). A plan that replaces
        nothing (no savings) leaves the model as it is and misses nothing."""
        if not self.checks or not savings:
            return 0.0
        by_saving: dict[float, list[float]] = {}
        for saved, miss in self.checks:
            by_saving.setdefault(saved, []).append(miss)
        xs = sorted(by_saving)
        ys = [sum(by_saving[x]) / len(by_saving[x]) for x in xs]
        saved = min(max(self._from_figures(savings)[0], xs[0]), xs[-1])
        return interpolate(xs, ys, saved)

    def predicted(self, savings: Sequence[float]) -> float:
        """The pruned model's time after the per-layer ``savings`` (timed alone), with what the
        whole-model checks showed they miss."""
        return max(self._from_figures(savings)[1] + self.miss(savings), 1e-12)

    def correct(self, ctx: PruneContext, savings: Sequence[float], candidate: nn.Module) -> float:
        """Time ``candidate``, the model the plan with ``savings`` makes, against dense in one session;
        what the per-layer prediction missed joins :attr:`checks` for every later prediction.
        Returns the candidate's measured speed-up over dense.

        Per-layer figures cannot see what a plan changes between layers: a token pruner's scoring,
        top-k and gather in every reducing block, a split or sliced layer's effect on its
        neighbours (caches, the vector units). The miss grows with the plan (a rank-1 model misses
        more than a rank-100 one), so it is read off the plans timed, linear in their savings:
        right at each of them, and a search corrected by it looks next between or beside them.
        """
        dense = ctx.dense_model if ctx.dense_model is not None else ctx.model
        with ctx.progress.task(f"latency: timing the chosen plan against dense ({self.cost.kind})"):
            dense_s, candidate_s = self.cost.model_seconds([dense, candidate])
        if not (dense_s > 0 and candidate_s > 0):
            raise LatencyError(f"latency: a whole-model check timed dense at {dense_s} s and the pruned model at "
                               f"{candidate_s} s; both must be positive (a cost model that cannot time them)")
        in_calibration_units = candidate_s * self.dense / dense_s  # the session's drift cancels in the ratio
        saved, from_figures = self._from_figures(savings)
        self.checks.append((saved, in_calibration_units - from_figures))
        return dense_s / candidate_s

    def correction_note(self, savings: Sequence[float], what: str) -> str:
        """The report's words for the correction of the plan with ``savings`` (``''`` when nothing was
        corrected); ``what``: what the per-layer figures leave out."""
        miss = self.miss(savings)
        if abs(miss) < 5e-4 * self.dense:  # nothing missed, to float rounding (cost: macs)
            return ""
        return (f"prediction corrected by timing the pruned model ({miss / self.dense:+.1%} of dense time "
                f"against the per-layer figures, which leave out {what})")

    def speedup(self, savings: Sequence[float]) -> float:
        """Predicted whole-model speed-up over dense after saving ``savings`` (per-layer)."""
        return self.dense / self.predicted(savings)

    @property
    def predicts(self) -> bool:
        """Whether the step predicts whole-model time: for a target, and whenever costs are measured
        (then the report shows predicted vs measured); ``only_if_faster`` by MACs decides per layer."""
        return self.target_speedup is not None or self.target_latency_ms is not None or self.cost.kind == "measured"

    @property
    def needed(self) -> float:
        """Time the step must save, in the model (≤ 0: the model is already fast enough)."""
        return self.now - self.goal if self.goal is not None else 0.0

    def reached(self, savings: Sequence[float]) -> bool:
        return self.goal is not None and self.predicted(savings) <= self.goal * (1 + 1e-9)

    def speed_plan(self, savings: Sequence[float], note: str = "") -> dict[str, Any]:
        """What the plan with ``savings`` predicts, for the step's report: the pruner returns it as
        :attr:`rmtp.contract.pruner.PruneResult.speed_plan` and ``prune_step`` measures it after. ``note``:
        the pruner's words on its choice (the fallback, the measurement's warnings and the assumed
        batch are added)."""
        notes = [note, self.fallback, *self.warnings, self._assumed_batch()]
        plan = {"predicted_speedup": self.speedup(savings), "target_speedup": self.target_speedup,
                "start_speedup": self.start_speedup, "cost": self.cost.describe(),
                "in_context_scale": self.scale, "note": "; ".join(filter(None, notes))}
        if self.checks:
            plan["overhead_fraction"] = self.miss(savings) / self.dense
        return plan

    def _assumed_batch(self) -> str:
        """For a measured target whose batch nobody gave: which batch it was planned at, since the
        speed-up at batch 1 is not the one at 32 (most targets missed in use were planned at 1)."""
        if self.goal is None or self.cost.kind != "measured" or "batch" in self.cost.settings.model_fields_set:
            return ""
        return (f"planned at batch {self.cost.settings.batch}, assumed: no latency.batch was given (nor a later "
                f"timed evaluate step's latency_batch); set it to the batch the model will serve at")

    def shortfall(self, savings: Sequence[float], what: str) -> str:
        """A report note when the target is out of reach ('' when it is reached)."""
        if self.goal is None or self.reached(savings):
            return ""
        where = "for the plan kept" if self.checks else "at its most compressed"
        return (f"target ×{self.target_speedup:.2f} not reachable by {what}: "
                f"predicted ×{self.speedup(savings):.2f} {where}")

    def keep_measured(self, timed: dict[int, float], chosen: int) -> int | None:
        """The plan to keep of those timed whole (``timed``: index → measured speed-up over dense),
        ``chosen`` being the search's choice; None: keep the model as the step received it.

        Only a plan measured faster than the model as it came is kept: of those, the gentlest
        (lowest index) that reached the target, else the fastest. A choice that measured slower,
        or was never timed (the corrections ran out), is not kept on a prediction; why goes to
        :attr:`fallback` for the report.
        """
        start = self.start_speedup
        faster = {i: s for i, s in timed.items() if s > start}
        goal = self.target_speedup
        reaching = sorted(i for i, s in faster.items() if goal is not None and s >= goal * (1 - 1e-9))
        keep = reaching[0] if reaching else max(faster, key=faster.__getitem__, default=None)
        if keep != chosen:
            self.fallback = self._fallback_note(timed, chosen, keep, bool(reaching))
        return keep

    def _fallback_note(self, timed: dict[int, float], chosen: int, keep: int | None, reached: bool) -> str:
        """The report's words for :meth:`keep_measured` keeping ``keep`` rather than ``chosen``."""
        start = f"the model as it came (×{self.start_speedup:.2f} over dense)"
        if keep is None:
            return (f"no plan timed whole was faster than {start}: the fastest measured ×{max(timed.values()):.2f}; "
                    f"the step keeps the model unchanged")
        choice = (f"the search's choice measured ×{timed[chosen]:.2f} over dense" if chosen in timed
                  else "the search's last choice was not timed whole")
        what = "the gentlest plan timed that reached the target" if reached else "the fastest plan timed"
        return f"{choice}: kept {what} instead (measured ×{timed[keep]:.2f})"


def first_reaching(candidates: Sequence[T], reached: Callable[[T], bool]) -> int:
    """Index of the first of ``candidates`` that ``reached`` accepts (``len(candidates)`` if none).

    ``candidates`` go from gentlest to strongest, so once one reaches a target every stronger one
    does; the first is the least loss that reaches it. Bisection: ⌈log₂ n⌉ + 1 calls of ``reached``.
    """
    lo, hi = 0, len(candidates)
    while lo < hi:
        mid = (lo + hi) // 2
        if reached(candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


#: Times a chosen plan is timed as a whole model and the search redone with what the per-layer
#: figures missed (:meth:`SpeedTarget.correct`). It usually settles in two or three; when it has
#: not by the last check, the search's choice after it is not itself timed, so a plan that was
#: timed is kept instead (:meth:`SpeedTarget.keep_measured`).
CORRECTIONS = 3


def reach_checked(ctx: PruneContext, target: SpeedTarget, candidates: Sequence[T],
                  savings: Callable[[T], Sequence[float]], build: Callable[[T], nn.Module]) -> int | None:
    """Index of the gentlest of ``candidates`` (gentlest first) whose plan reaches ``target``, the
    choice checked on the whole model: the plan's model (``build``) is timed against dense, the
    search redone with what the figures missed there (:meth:`SpeedTarget.correct`,
    :meth:`SpeedTarget.miss`), at most :data:`CORRECTIONS` times, until the choice holds. What is
    kept was measured (:meth:`SpeedTarget.keep_measured`): a choice that measured slower than the
    model as it came, or was not timed, gives way to the gentlest plan timed that reached the
    target, else the fastest timed; None (keep the model unchanged) when no plan timed was faster.
    Without a goal, the strongest candidate and no check.

    The miss is linear between the plans timed, so the prediction may rise over a stretch where a
    stronger plan measured slower; the bisection stays sound, since every plan timed and found
    short lies on the gentle side of every plan timed that reached.

    Why: per-layer figures are timed alone; a plan changes the model around them too (a token
    pruner's scoring and gather, an spp level's thinner matmuls that no longer fill the vector
    units the way the timed branch did), and only the whole model shows what that costs.
    """
    def choose() -> int:
        return min(first_reaching(candidates, lambda c: target.reached(savings(c))), len(candidates) - 1)

    index = choose()
    if target.goal is None:
        return index
    timed: dict[int, float] = {}
    for _ in range(CORRECTIONS):
        timed[index] = target.correct(ctx, savings(candidates[index]), build(candidates[index]))
        again = choose()
        if again == index:
            break
        index = again
    return target.keep_measured(timed, index)


def speed_target(ctx: PruneContext, target_speedup: float | None, target_latency_ms: float | None) -> SpeedTarget:
    """A step's speed budget (times are taken by :meth:`SpeedTarget.calibrate`, once the pruner knows
    which layers it may replace)."""
    cost = ctx.cost_model()
    if target_latency_ms is not None and cost.kind != "measured":
        raise LatencyError("target_latency_ms is a time and needs latency.cost: measured (cost: macs predicts "
                           "by MACs); use target_speedup instead")
    return SpeedTarget(cost=cost, target_speedup=target_speedup, target_latency_ms=target_latency_ms)


def speed_report(plan: dict[str, Any] | None) -> str:
    """One line: the plan's predicted speed-up (and target), for a step's notes."""
    if not plan:
        return ""
    target = f" (target ×{plan['target_speedup']:.2f})" if plan.get("target_speedup") else ""
    return f"predicted ×{plan['predicted_speedup']:.2f} over dense{target}, cost model: {plan['cost']}"
