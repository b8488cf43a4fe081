"""Accuracy budgets for prune steps: the strongest setting of a pruner that stays close to dense.

A prune step's ``accuracy_budget:`` (``rmtp.prune(..., accuracy_budget=...)``) bounds how far the
pruned model may move away from the dense model on calibration images held out from the pruner:

* ``max_drop``: the share of held-out images on which the pruned model's top-1 class may differ
  from the dense model's (0.02: it must agree with dense on at least 98% of them);
* ``max_kl``: the mean KL(dense ‖ pruned) of the two models' softmax outputs per image, in nats.

A pruner says which of its params sets its strength through :meth:`rmtp.contract.pruner.Pruner.strength_knob`
(a :class:`StrengthKnob`: the param, its weak and strong ends, integer or not): svd-mp's
``target_params``, n:m's ``target_macs``, spp's ``ratio``, tome's ``r``, token-cls/token-mean's
``r_max``, magnitude's ``sparsity``; a step with a speed target (``target_speedup``) searches the
speed target itself, so the result is the fastest model within the budget. :func:`search` then
bisects the knob between its ends, at most ``evaluations`` candidates, each pruned from a copy of the
model and scored by an ``evaluate(value) -> (agreement, kl)`` it is given (so tests drive it without
models; :mod:`rmtp.fidelity.agreement` scores real ones).

This module is torch-free: recipes validate budgets with it before any model exists.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rmtp.errors import RmtpError

if TYPE_CHECKING:
    from torch import nn

    from rmtp.contract.pruner import Pruner, PrunerParams

#: The agreement (share of images) under which a step's report warns that the model is broken.
BROKEN_AGREEMENT = 0.5
#: Fewest held-out images a budget is scored on: below this one image moves the agreement by > 12%.
MIN_HELD_OUT = 8
#: The weakest speed target a budget tries when the step gives ``target_speedup``.
WEAKEST_SPEEDUP = 1.05


class AccuracyBudget(BaseModel):
    """``accuracy_budget:`` of a prune step: how far from the dense model its result may be, on
    calibration images the pruner does not calibrate on (give ``max_drop``, ``max_kl`` or both)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_drop: float | None = Field(None, ge=0.0, le=1.0,
                                   description="largest share of held-out calibration images on which the "
                                               "pruned model's top-1 class may differ from the dense model's "
                                               "(0.02: top-1 agreement with dense at least 98%)")
    max_kl: float | None = Field(None, gt=0.0, le=100.0,
                                 description="largest mean KL(dense ‖ pruned) of the softmax outputs per "
                                             "held-out image, in nats")
    holdout: float = Field(0.25, gt=0.0, le=0.5,
                           description="share of the calibration images held out (seeded) from a pruner "
                                       "that calibrates on them, to score on; a pruner that takes no "
                                       "calibration data is scored on all of them")
    evaluations: int = Field(8, ge=2, le=32, description="most candidates pruned and scored (bisection over "
                                                         "the pruner's strength, strongest end first)")

    @model_validator(mode="after")
    def _a_limit(self) -> AccuracyBudget:
        if self.max_drop is None and self.max_kl is None:
            raise ValueError("give max_drop (share of top-1 agreement with dense that may be lost) and/or "
                             "max_kl (mean KL to dense per image)")
        return self

    def within(self, agreement: float, kl: float) -> bool:
        """Whether a candidate with this top-1 ``agreement`` (share) and mean ``kl`` is within budget
        (a candidate exactly at a limit is)."""
        ok = True
        if self.max_drop is not None:
            ok = ok and 1.0 - agreement <= self.max_drop + 1e-9
        if self.max_kl is not None:
            ok = ok and kl <= self.max_kl + 1e-12
        return ok

    def describe(self) -> str:
        """'max_drop 2% (agreement ≥ 98%)', 'max_kl 0.05', or both."""
        parts = []
        if self.max_drop is not None:
            parts.append(f"max_drop {_share(self.max_drop)} (agreement ≥ {_share(1 - self.max_drop)})")
        if self.max_kl is not None:
            parts.append(f"max_kl {self.max_kl:g}")
        return " and ".join(parts)


@dataclass(frozen=True)
class StrengthKnob:
    """The one param of a pruner that sets how hard it prunes, as an accuracy budget searches it.

    ``weak`` and ``strong`` are its two ends (either may be the larger: svd-mp's ``target_params``
    is stronger when smaller); ``integer`` knobs (tome's ``r``) take whole values; a float search
    stops once its bracket is narrower than ``resolution``. A value the step's params give for the
    knob is the strongest the search tries (:func:`budget_knob`).
    """

    param: str
    weak: float
    strong: float
    integer: bool = False
    resolution: float | None = None

    def stronger(self, a: float, b: float) -> bool:
        """Whether ``a`` prunes harder than ``b``."""
        return a > b if self.strong > self.weak else a < b

    def value(self, raw: float) -> float | int:
        return int(round(raw)) if self.integer else float(raw)

    def params_at(self, params: PrunerParams, value: float) -> PrunerParams:
        """``params`` with the knob at ``value``, validated again by the pruner's ``Params``
        (only the keys the step set are carried, so validators reading ``model_fields_set`` see
        what the user gave plus the knob)."""
        given = params.model_dump(exclude_unset=True)
        given[self.param] = self.value(value)
        return type(params).model_validate(given)

    def format(self, value: float) -> str:
        value = self.value(value)
        return f"{self.param} = {value}" if self.integer else f"{self.param} = {value:.4g}"


def speed_knob(params: PrunerParams) -> StrengthKnob | None:
    """The knob of a step with ``target_speedup``: the speed target itself, from ×1.05 (weak) to the
    value given (strong), so the budget finds the fastest model within it. None without one."""
    target = getattr(params, "target_speedup", None)
    if target is None:
        return None
    return StrengthKnob("target_speedup", weak=min(WEAKEST_SPEEDUP, float(target)), strong=float(target),
                        resolution=0.02)


def budget_knob(pruner_cls: type[Pruner], params: PrunerParams, model: nn.Module | None = None) -> StrengthKnob:
    """The knob an accuracy budget searches for this step, its strong end the value the step's params
    give for it when they give one; refused in one line (:class:`~rmtp.errors.RmtpError`) when the
    pruner declares none for these params, or when either end is not a valid value of its params."""
    name = pruner_cls.name
    if getattr(params, "target_latency_ms", None) is not None:
        raise RmtpError(f"{name}: an accuracy budget searches target_speedup for the fastest model within it, "
                        f"not target_latency_ms; give target_speedup instead")
    try:
        knob = pruner_cls.strength_knob(params, model)
    except ValueError as exc:
        raise RmtpError(f"{name}: {exc}") from None
    if knob is None:
        raise RmtpError(f"{name} declares no strength an accuracy budget could choose (Pruner.strength_knob); "
                        f"set its params by hand, or use a pruner that has one (svd-mp, n:m, spp, tome, "
                        f"token-cls, token-mean, magnitude)")
    if knob.param in params.model_fields_set:
        given = float(getattr(params, knob.param))
        weak = given if knob.stronger(knob.weak, given) else knob.weak  # given weaker than the weak end
        knob = StrengthKnob(knob.param, weak=weak, strong=given, integer=knob.integer, resolution=knob.resolution)
    for end in (knob.weak, knob.strong):
        try:
            knob.params_at(params, end)
        except ValidationError as exc:
            reason = exc.errors(include_url=False)[0]["msg"]
            raise RmtpError(f"{name}: an accuracy budget would try {knob.format(end)}, which its params refuse "
                            f"({reason})") from None
    return knob


@dataclass
class Trial:
    """One candidate the search pruned and scored."""

    value: float
    agreement: float
    kl: float
    within: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchResult:
    """What :func:`search` chose: ``value`` and why (``outcome``).

    * ``"strongest"``: the strong end is within budget;
    * ``"bisected"``: the strongest candidate found within budget between the two ends;
    * ``"weakest"``: the weak end is within budget and no stronger candidate was (every midpoint
      tried broke it, or none could be tried: no evaluations left, or an integer bracket already
      closed); ``value`` is the weak end, which no bisection chose;
    * ``"impossible"``: even the weak end breaks the budget; ``value`` is the weak end.
    """

    value: float
    outcome: Literal["strongest", "bisected", "weakest", "impossible"]
    trials: list[Trial] = field(default_factory=list)

    @property
    def chosen(self) -> Trial:
        return next(t for t in self.trials if t.value == self.value)


def search(knob: StrengthKnob, budget: AccuracyBudget,
           evaluate: Callable[[float], tuple[float, float]]) -> SearchResult:
    """The strongest value of ``knob`` whose candidate ``evaluate(value) -> (agreement, kl)`` keeps
    within ``budget``, in at most ``budget.evaluations`` calls; deterministic for a deterministic
    ``evaluate``.

    The strong end is tried first (within budget: done), then the weak end (breaks the budget: the
    budget cannot be had, the weak end is returned), then bisection between the strongest value
    known within budget and the weakest known outside it. Integer midpoints round toward the weak
    end; a float search stops when the bracket is narrower than ``knob.resolution`` (default: 1%
    of the range). The result is always a value that was evaluated within budget (or the weak end):
    a score that is not monotone in the knob still yields a tried, passing setting, possibly not
    the strongest one that passes. Ties go to the weaker setting: a value is only taken over a
    weaker one when it was itself scored within budget.
    """
    trials: list[Trial] = []

    def trial(value: float) -> bool:
        value = knob.value(value)
        agreement, kl = evaluate(value)
        trials.append(Trial(value=value, agreement=float(agreement), kl=float(kl),
                            within=budget.within(agreement, kl)))
        return trials[-1].within

    strong, weak = knob.value(knob.strong), knob.value(knob.weak)
    if trial(strong):
        return SearchResult(strong, "strongest", trials)
    if strong == weak:
        return SearchResult(weak, "impossible", trials)
    if not trial(weak):
        return SearchResult(weak, "impossible", trials)
    good, bad = weak, strong  # good: within budget (weaker side); bad: outside it
    resolution = knob.resolution if knob.resolution is not None else abs(knob.strong - knob.weak) / 100
    while len(trials) < budget.evaluations:
        if knob.integer:
            if abs(bad - good) <= 1:
                break
            half = (good + bad) / 2
            middle = math.floor(half) if good < bad else math.ceil(half)  # toward the weak (good) side
        else:
            if abs(bad - good) <= resolution:
                break
            middle = (good + bad) / 2
        if trial(middle):
            good = knob.value(middle)
        else:
            bad = knob.value(middle)
    return SearchResult(good, "weakest" if good == weak else "bisected", trials)


def describe_search(knob: StrengthKnob, budget: AccuracyBudget, result: SearchResult, pruner: str, *,
                    spent: bool = False) -> str:
    """One line: what the budget chose and what was tried, e.g. ``accuracy budget max_drop 2%
    (agreement ≥ 98%): r = 9, the strongest within it of 5 tried (r = 16: 91.0% ✗, …)``.
    ``spent``: the model broke the budget before the step pruned (an impossible outcome is then
    not the pruner's doing)."""
    tried = ", ".join(f"{_value(knob, t.value)}: {t.agreement:.1%}/KL {t.kl:.3g} {'✓' if t.within else '✗'}"
                      for t in result.trials)
    head = f"accuracy budget {budget.describe()}: {knob.format(result.value)}"
    if result.outcome == "strongest":
        why = "its strongest end, within it"
    elif result.outcome == "bisected":
        why = f"the strongest within it of {len(result.trials)} tried"
    elif result.outcome == "weakest":
        why = f"its weakest end, the only setting within it of {len(result.trials)} tried"
    elif spent:
        why = "the weakest setting: the model broke the budget before this step pruned"
    else:
        why = f"the weakest setting, and even it breaks the budget: {pruner} cannot stay within it"
    return f"{head}, {why} ({tried})"


def speed_note(knob: StrengthKnob, budget: AccuracyBudget, result: SearchResult) -> str:
    """'' unless the knob is a speed target the budget did not allow: then that it cannot be had and
    what was chosen instead."""
    if knob.param != "target_speedup" or result.outcome == "strongest":
        return ""
    if result.outcome == "impossible":
        return (f"target_speedup ×{knob.strong:g} cannot be had within {budget.describe()}: even "
                f"×{result.value:.3g} breaks it; the step applied ×{result.value:.3g}")
    return (f"target_speedup ×{knob.strong:g} cannot be had within {budget.describe()}; the fastest within it "
            f"found is target_speedup ×{result.value:.3g}")


def _value(knob: StrengthKnob, value: float) -> str:
    value = knob.value(value)
    return str(value) if knob.integer else f"{value:.4g}"


def _share(value: float) -> str:
    text = f"{value * 100:.2f}".rstrip("0").rstrip(".")
    return f"{text}%"
