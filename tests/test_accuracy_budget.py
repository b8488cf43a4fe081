"""Accuracy budgets (``accuracy_budget:``, ``rmtp.prune(..., accuracy_budget=)``): the search over a
pruner's strength knob, driven by injected scores; the knobs the built-in pruners declare; recipe
validation; and real runs on the digits ViT, where the budget changes the strength chosen and every
step with calibration images reports its agreement with dense (and warns below 50%)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import timm
import torch
from conftest import REPO, TINY_VIT, tiny_recipe
from rich.console import Console

import rmtp
from rmtp.contract.pruner import LayerRow, Pruner, PrunerParams
from rmtp.errors import RecipeError, RmtpError
from rmtp.fidelity.accuracy_budget import AccuracyBudget, StrengthKnob, budget_knob, describe_search, search, speed_note
from rmtp.fidelity.agreement import DenseReference, images_of
from rmtp.plugins import get_plugins
from rmtp.reports.records import StepReport
from rmtp.reports.render import render_step
from rmtp.run.recipe import parse_recipe
from rmtp.storage.weights import read_state_dict


def _drop(limit: float, evaluations: int = 8) -> AccuracyBudget:
    return AccuracyBudget(max_drop=limit, evaluations=evaluations)


def _counting(score):
    calls: list[float] = []

    def evaluate(value: float) -> tuple[float, float]:
        calls.append(value)
        return score(value), 0.0

    return evaluate, calls


# ------------------------------------------------------------------------------ the search itself


def test_bisection_takes_the_strongest_value_within_budget_and_is_deterministic() -> None:
    knob = StrengthKnob("sparsity", weak=0.0, strong=0.95, resolution=0.001)
    runs = []
    for _ in range(2):
        evaluate, calls = _counting(lambda s: 1.0 - s)  # agreement falls as sparsity rises
        runs.append((search(knob, _drop(0.3, evaluations=12), evaluate), calls))
    (first, calls), (second, again) = runs
    assert calls == again and first.value == second.value  # same candidates, same choice
    assert calls[:2] == [0.95, 0.0]  # strongest end first, then the weakest
    assert first.outcome == "bisected" and len(calls) <= 12
    assert 0.3 - 0.001 <= first.value <= 0.3 + 1e-9  # the limit, from the safe side
    assert first.chosen.within and all(not t.within for t in first.trials if t.value > first.value)


def test_a_knob_that_weakens_as_it_grows_is_searched_the_other_way() -> None:
    knob = StrengthKnob("target_params", weak=0.95, strong=0.2, resolution=0.01)
    evaluate, calls = _counting(lambda kept: kept)  # keeping less agrees less
    result = search(knob, _drop(0.5), evaluate)
    assert 0.5 <= result.value <= 0.51 and calls[:2] == [0.2, 0.95]


def test_the_strongest_end_within_budget_is_one_evaluation() -> None:
    evaluate, calls = _counting(lambda s: 0.99)
    result = search(StrengthKnob("r", weak=0, strong=32, integer=True), _drop(0.05), evaluate)
    assert (result.value, result.outcome, calls) == (32, "strongest", [32])


def test_an_impossible_budget_takes_the_weakest_setting_and_says_so() -> None:
    evaluate, calls = _counting(lambda s: 0.5)
    result = search(StrengthKnob("sparsity", weak=0.0, strong=0.9), _drop(0.01), evaluate)
    assert (result.value, result.outcome, calls) == (0.0, "impossible", [0.9, 0.0])


@pytest.mark.parametrize("knob, evaluations, tried", [
    (StrengthKnob("sparsity", weak=0.0, strong=0.9, resolution=0.1), 8, [0.9, 0.0, 0.45, 0.225, 0.1125, 0.05625]),
    (StrengthKnob("sparsity", weak=0.0, strong=0.9), 2, [0.9, 0.0]),  # no evaluation left to bisect with
    (StrengthKnob("r", weak=0, strong=1, integer=True), 8, [1, 0]),  # the integer bracket is already closed
], ids=["every-midpoint-fails", "no-evaluations-left", "adjacent-integers"])
def test_only_the_weak_end_within_budget_is_called_weakest_not_bisected(knob, evaluations, tried) -> None:
    evaluate, calls = _counting(lambda s: 1.0 if s == 0 else 0.5)  # only the weak end passes
    budget = _drop(0.05, evaluations=evaluations)
    result = search(knob, budget, evaluate)
    assert (result.value, result.outcome, calls) == (0, "weakest", tried)
    line = describe_search(knob, budget, result, "magnitude")
    assert f"its weakest end, the only setting within it of {len(tried)} tried" in line


def test_integer_knobs_take_whole_values_and_round_toward_the_weak_end() -> None:
    evaluate, calls = _counting(lambda r: 1.0 - r / 40)  # r = 8 is exactly at the limit: within
    result = search(StrengthKnob("r", weak=0, strong=32, integer=True), _drop(0.2, evaluations=32), evaluate)
    assert result.value == 8 and all(isinstance(value, int) for value in calls)
    assert calls == [32, 0, 16, 8, 12, 10, 9]  # (0 + 32) / 2, then floors toward 0 once ✗
    assert len(set(calls)) == len(calls)  # nothing evaluated twice


def test_at_most_the_budgeted_evaluations_are_made() -> None:
    evaluate, calls = _counting(lambda s: 1.0 - s)
    result = search(StrengthKnob("sparsity", weak=0.0, strong=1.0, resolution=1e-9), _drop(0.37, evaluations=5),
                    evaluate)
    assert len(calls) == 5 and result.chosen.within


def test_a_score_that_is_not_monotone_still_yields_a_tried_passing_value_deterministically() -> None:
    def bumpy(s: float) -> float:  # passes below 0.3 and again in [0.6, 0.7): the search must not mix them up
        return 0.99 if s < 0.3 or 0.6 <= s < 0.7 else 0.5

    results = []
    for _ in range(2):
        evaluate, calls = _counting(bumpy)
        results.append((search(StrengthKnob("sparsity", weak=0.0, strong=0.9), _drop(0.05), evaluate), calls))
    (result, calls), (again, calls_again) = results
    assert calls == calls_again and result.value == again.value
    assert result.value in calls and result.chosen.within
    assert bumpy(result.value) == 0.99


def test_a_kl_budget_is_checked_alone_or_with_max_drop() -> None:
    knob = StrengthKnob("sparsity", weak=0.0, strong=1.0, resolution=0.01)
    result = search(knob, AccuracyBudget(max_kl=0.25), lambda s: (1.0, s))  # kl = sparsity, agreement intact
    assert 0.24 <= result.value <= 0.25
    both = search(knob, AccuracyBudget(max_kl=0.25, max_drop=0.1), lambda s: (1.0 - s, s))
    assert 0.09 <= both.value <= 0.1  # the tighter of the two


def test_a_speed_target_the_budget_does_not_allow_is_said_to_be_out_of_reach() -> None:
    knob = StrengthKnob("target_speedup", weak=1.05, strong=3.0, resolution=0.02)
    budget = _drop(0.02)
    result = search(knob, budget, lambda speedup: (1.0 if speedup <= 1.5 else 0.9, 0.0))
    assert 1.45 <= result.value <= 1.5  # 8 candidates: within 1.95 / 2**6 of the limit
    assert speed_note(knob, budget, result).startswith("target_speedup ×3 cannot be had within max_drop 2% "
                                                       "(agreement ≥ 98%); the fastest within it found is "
                                                       "target_speedup ×1.")
    assert speed_note(knob, budget, search(knob, budget, lambda speedup: (1.0, 0.0))) == ""  # reached


@pytest.mark.parametrize("values, message", [
    ({}, "give max_drop"), ({"max_drop": 1.5}, "less than or equal to 1"), ({"max_kl": 0}, "greater than 0"),
    ({"max_drop": 0.1, "holdout": 0.9}, "less than or equal to 0.5"), ({"max_drop": 0.1, "evaluations": 1}, "2"),
])
def test_budget_settings_are_validated(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AccuracyBudget(**values)


# --------------------------------------------------------------------------------- the knobs


def _params(name: str, **values: object) -> tuple[type[Pruner], PrunerParams]:
    cls = get_plugins().pruners.get(name)
    return cls, cls.Params(**values)


@pytest.mark.parametrize("name, values, param, weak, strong", [
    ("svd-mp", {}, "target_params", 0.95, 0.2),
    ("svd-mp", {"target_params": 0.5}, "target_params", 0.95, 0.5),  # a value given: the strongest tried
    ("svd-mp", {"target_speedup": 1.5}, "target_speedup", 1.05, 1.5),  # a speed target: the fastest within
    ("n:m", {}, "target_macs", 1.0, 0.5),
    ("n:m", {"patterns": ["dense", "1:4"], "target_macs": 0.4}, "target_macs", 1.0, 0.4),
    ("spp", {"ratio": 0.4}, "ratio", 0.02, 0.4),
    ("tome", {}, "r", 0, 100),
    ("tome", {"r": 12}, "r", 0, 12),
    ("token-cls", {}, "r_max", 0.0, 0.9),
    ("token-mean", {"r_max": 0.5}, "r_max", 0.0, 0.5),
    ("magnitude", {"sparsity": 0.7}, "sparsity", 0.0, 0.7),
])
def test_every_built_in_pruner_declares_its_knob(name: str, values: dict, param: str, weak: float,
                                                 strong: float) -> None:
    cls, params = _params(name, **values)
    knob = budget_knob(cls, params)
    assert (knob.param, knob.weak, knob.strong) == (param, weak, strong)
    assert knob.params_at(params, knob.weak) != knob.params_at(params, knob.strong)


def test_tome_bounds_r_by_the_model_patches() -> None:
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT)  # 16 patches
    cls, params = _params("tome")
    assert budget_knob(cls, params, model).strong == 8


@pytest.mark.parametrize("name, values, message", [
    ("n:m", {"budget": "uniform"}, "budget: uniform puts n:m on every layer"),
    ("spp", {"ratios": [0.2, 0.4]}, "give ratio"),
    ("tome", {"r_list": [1, 2]}, "r_list sets every block by hand"),
    ("token-cls", {"keep": [0.9, 0.8]}, "keep sets every block by hand"),
    ("svd-mp", {"target_latency_ms": 5.0}, "give target_speedup instead"),
])
def test_params_with_nothing_to_search_are_refused_in_one_line(name: str, values: dict, message: str) -> None:
    cls, params = _params(name, **values)
    with pytest.raises(RmtpError, match=message) as info:
        budget_knob(cls, params)
    assert "\n" not in str(info.value)


class _NoKnob(Pruner):
    name, description, kind = "no-knob", "a pruner without a strength knob", "mask"

    class Params(PrunerParams):
        pass

    def prune(self, ctx, params) -> list[LayerRow]:
        return []


def test_a_pruner_without_a_knob_is_refused() -> None:
    with pytest.raises(RmtpError, match="no-knob declares no strength an accuracy budget could choose"):
        budget_knob(_NoKnob, _NoKnob.Params())


# --------------------------------------------------------------------------------- recipes


def _budget_recipe(budget: object, prune: str = "tome", params: dict | None = None) -> dict:
    return tiny_recipe([{"prune": prune, "params": params or {}, "accuracy_budget": budget}, {"evaluate": {}}])


def test_a_recipe_with_a_budget_validates_and_carries_it() -> None:
    recipe = parse_recipe(_budget_recipe({"max_drop": 0.05, "holdout": 0.2}))
    assert recipe.plan[0].accuracy_budget == AccuracyBudget(max_drop=0.05, holdout=0.2)
    assert recipe.to_dict()["steps"][0]["accuracy_budget"]["max_drop"] == 0.05


@pytest.mark.parametrize("budget, params, expected", [
    ({"max_drop": 1.5}, {}, "<recipe>: steps[0].accuracy_budget.max_drop: Input should be less than or equal to 1 "
                            "(got 1.5)"),
    ({"max_drop": 0.1, "tolerance": 2}, {}, "<recipe>: steps[0].accuracy_budget.tolerance: unknown key "
                                            "'tolerance'; allowed: max_drop, max_kl, holdout, evaluations"),
    ({"holdout": 0.2}, {}, "<recipe>: steps[0].accuracy_budget: Value error, give max_drop"),
    ({"max_drop": 0.1}, {"r_list": [1, 1]},
     "<recipe>: steps[0].accuracy_budget: tome: r_list sets every block by hand"),
])
def test_bad_budgets_are_refused_in_one_line_naming_the_key(budget: dict, params: dict, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe(_budget_recipe(budget, params=params))
    assert len(info.value.problems) == 1 and "\n" not in info.value.problems[0]
    assert info.value.problems[0].startswith(expected), info.value.problems[0]


# --------------------------------------------------------------------------- real tiny runs


@pytest.fixture(scope="module")
def digits() -> tuple[torch.nn.Module, torch.utils.data.DataLoader]:
    """The committed digits ViT (trained: pruning it costs agreement) and 48 calibration images."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, num_classes=10,
                              embed_dim=96, depth=6, num_heads=3)
    model.load_state_dict(read_state_dict(REPO / "models" / "digits_vit.safetensors"))
    data = rmtp.build_data({"name": "digits", "calibration_size": 48, "batch_size": 48}, model.eval())
    return model, data.loader("calibration")


def test_the_budget_changes_the_strength_chosen_and_the_report_shows_it(digits) -> None:
    model, calib = digits
    dense = rmtp.frozen_copy(model)
    loose = rmtp.prune(copy.deepcopy(model), "magnitude", sparsity=0.9, calibration=calib, dense=dense,
                       accuracy_budget={"max_drop": 0.5, "evaluations": 4})
    tight = rmtp.prune(copy.deepcopy(model), "magnitude", sparsity=0.9, calibration=calib, dense=dense,
                       accuracy_budget={"max_drop": 0.05, "evaluations": 4})
    chosen = [report.agreement["budget"]["chosen"] for report in (loose, tight)]
    assert 0 < chosen[1] < chosen[0] < 0.9, chosen
    for report, limit in ((loose, 0.5), (tight, 0.05)):
        assert report.agreement["top1"] >= 1 - limit  # the applied model is the one scored within budget
        assert report.agreement["images"] == 48 and "magnitude uses none" in report.agreement["where"]
        nonzeros = 1 - report.stats.nonzeros / report.baseline.nonzeros
        assert nonzeros == pytest.approx(report.agreement["budget"]["chosen"], abs=0.02)
    again = rmtp.prune(copy.deepcopy(model), "magnitude", sparsity=0.9, calibration=calib, dense=dense,
                       accuracy_budget={"max_drop": 0.05, "evaluations": 4})
    assert again.agreement == tight.agreement  # deterministic
    text = _rendered(tight)
    assert "agreement with dense:" in text and "accuracy budget max_drop 5% (agreement ≥ 95%): sparsity =" in text
    assert "warning" not in text
    round_trip = StepReport.from_dict(json.loads(json.dumps(tight.to_dict())))
    assert round_trip.agreement == tight.agreement


def test_a_pruner_that_calibrates_never_sees_the_held_out_images(digits, monkeypatch) -> None:
    model, calib = digits
    seen: list[int] = []
    seen_images: list[torch.Tensor] = []
    scored: list[torch.Tensor] = []
    original = DenseReference.__init__

    def spy(self, dense, images, **kwargs):
        scored.append(images.clone())
        original(self, dense, images, **kwargs)

    monkeypatch.setattr(DenseReference, "__init__", spy)

    class Counting(_NoKnob):
        name = "counting"
        needs_calibration = True

        class Params(PrunerParams):
            strength: float = 0.5

        @classmethod
        def strength_knob(cls, params, model=None):
            return StrengthKnob("strength", weak=0.0, strong=1.0)

        def prune(self, ctx, params):
            seen.append(sum(len(batch[0]) for batch in ctx.calibration))
            seen_images.extend(image for batch in ctx.calibration for image in batch[0])
            return []

    report = rmtp.prune(copy.deepcopy(model), Counting, calibration=calib, accuracy_budget={"max_drop": 0.1},
                        arch="vit")
    assert set(seen) == {36}  # 48 images, a quarter held out: every candidate and the final run saw 36
    assert report.agreement["images"] == 12 and report.agreement["held_out"]
    assert "12 held-out calibration images (seed 0; counting calibrated on the other 36)" in report.agreement["where"]
    held = {tuple(image.flatten().tolist()) for images in scored for image in images}
    assert len(held) == 12
    assert not held & {tuple(image.flatten().tolist()) for image in seen_images}


def test_a_budget_that_cannot_be_had_applies_the_weakest_setting_and_warns(digits) -> None:
    model, calib = digits
    tried: list[float] = []

    class Breaking(_NoKnob):  # whatever its strength, the head is zeroed: the model is always broken
        name = "breaking"

        class Params(PrunerParams):
            strength: float = 1.0

        @classmethod
        def strength_knob(cls, params, model=None):
            return StrengthKnob("strength", weak=0.1, strong=1.0)

        def prune(self, ctx, params):
            tried.append(params.strength)
            ctx.model.head.weight.data.zero_()
            ctx.model.head.bias.data.copy_(torch.arange(10.0))
            return []

    report = rmtp.prune(copy.deepcopy(model), Breaking, calibration=calib, accuracy_budget={"max_drop": 0.1},
                        arch="vit")
    assert tried == [1.0, 0.1, 0.1]  # strongest, weakest: out of reach; the weakest applied
    assert report.agreement["budget"]["outcome"] == "impossible" and report.agreement["budget"]["chosen"] == 0.1
    assert report.warnings[0].startswith("accuracy budget max_drop 10% (agreement ≥ 90%) cannot be had with "
                                         "breaking: even strength = 0.1 (the weakest setting) leaves")
    assert "the model is broken" in report.warnings[1] and "weakest setting broke it" in report.warnings[1]


def test_a_budget_the_earlier_steps_spent_says_so_instead_of_blaming_this_pruner(digits) -> None:
    """A budget counts from the dense model: a second step gets what the first one left. When the
    model already breaks the budget before the step prunes, the warning says the earlier steps spent
    it (a gentler setting of this pruner cannot help), not "prune with another method"."""
    model, calib = digits
    dense = rmtp.frozen_copy(model)
    first = copy.deepcopy(model)
    rmtp.prune(first, "magnitude", sparsity=0.8, calibration=calib)
    incoming = DenseReference(dense, images_of(calib), device=torch.device("cpu")).score(first)
    assert incoming[0] < 0.98  # the first step alone already breaks max_drop 2%
    spent = rmtp.prune(copy.deepcopy(first), "magnitude", sparsity=0.9, calibration=calib, dense=dense,
                       accuracy_budget={"max_drop": 0.02, "evaluations": 3})
    assert spent.agreement["budget"]["outcome"] == "impossible"
    # sparsity 0 leaves the incoming model as it was: its figures are said once
    assert spent.warnings[0] == (
        f"accuracy budget max_drop 2% (agreement ≥ 98%) cannot be had with magnitude: the model as it came to this "
        f"step already agrees with dense on only {incoming[0]:.1%} (KL {incoming[1]:.3g}); a budget counts from the "
        f"dense model, and what changed the model before this step (a recipe's earlier steps) spent it. sparsity = 0 "
        f"(the weakest setting) was applied: give this step a looser budget than the earlier ones, or let them prune "
        f"less")
    assert spent.notes[0].startswith("accuracy budget max_drop 2% (agreement ≥ 98%): sparsity = 0, the weakest "
                                     "setting: the model broke the budget before this step pruned (")
    # a speed target keeps its own warning, which now says the same
    fastest = rmtp.prune(copy.deepcopy(first), "tome", target_speedup=1.5, latency={"cost": "macs"},
                         calibration=calib, dense=dense, accuracy_budget={"max_drop": 0.02, "evaluations": 3})
    assert fastest.agreement["budget"]["outcome"] == "impossible"
    assert fastest.warnings[0].startswith("target_speedup ×1.5 cannot be had within max_drop 2% (agreement ≥ 98%): "
                                          "even ×1.05 breaks it; the step applied ×1.05; the model as it came to "
                                          f"this step already agrees with dense on only {incoming[0]:.1%} (KL ")
    assert fastest.warnings[0].endswith("what changed the model before this step (a recipe's earlier steps) spent it")


def test_a_broken_model_gets_a_warning_that_says_what_would_recover_it(digits) -> None:
    model, calib = digits
    report = rmtp.prune(copy.deepcopy(model), "magnitude", sparsity=0.9, calibration=calib)
    assert report.agreement["top1"] < 0.5 and len(report.warnings) == 1
    warning = report.warnings[0]
    assert warning.startswith("magnitude left ") and "the model is broken" in warning
    assert "reconstruct: step" in warning and "accuracy_budget: {max_drop: 0.05}" in warning
    text = _rendered(report)
    assert "warning: magnitude left" in text
    assert report.to_dict()["warnings"] == [warning]


def test_a_calibrating_pruner_reports_agreement_on_held_out_images_when_given(digits) -> None:
    """n:m with Wanda scores calibrates on ``calibration``; with ``held_out`` its report's agreement is
    measured there (the dense model's and the result's predictions on exactly those images), without
    it on the calibration images it fitted, labelled so."""
    from rmtp.fidelity.agreement import DenseReference, images_of

    model, calib = digits
    data = rmtp.build_data({"name": "digits", "calibration_size": 48, "batch_size": 48}, model.eval())
    val = data.loader("val")
    dense = rmtp.frozen_copy(model)
    params = {"n": 2, "m": 4, "score": "wanda", "budget": "uniform", "only_if_faster": False}
    fitted = copy.deepcopy(model)
    seen = rmtp.prune(fitted, "n:m", calibration=calib, dense=dense, **params)
    assert not seen.agreement["held_out"] and "not held out" in seen.agreement["where"]
    assert seen.agreement["images"] == 48
    unseen_model = copy.deepcopy(model)
    unseen = rmtp.prune(unseen_model, "n:m", calibration=calib, dense=dense, held_out=val, **params)
    assert torch.equal(fitted.blocks[0].mlp.fc1.weight, unseen_model.blocks[0].mlp.fc1.weight)  # same pruning
    images = images_of(val, 256)
    assert unseen.agreement["held_out"] and unseen.agreement["images"] == len(images) == min(256, len(data.val))
    assert unseen.agreement["where"] == f"{len(images)} held-out images (n:m calibrated on others)"
    top1, kl = DenseReference(dense, images, device=torch.device("cpu")).score(unseen_model)
    assert unseen.agreement["top1"] == pytest.approx(top1) and unseen.agreement["kl"] == pytest.approx(kl)


def test_a_recipe_step_that_calibrates_reports_agreement_on_the_val_split() -> None:
    raw = tiny_recipe([{"prune": "n:m", "params": {"n": 2, "m": 4, "score": "wanda", "budget": "uniform",
                                                   "only_if_faster": False}}, {"evaluate": {}}])
    raw["data"]["calibration_size"] = 16
    result = rmtp.run_recipe(parse_recipe(raw))
    agreement = result.report.steps[0].agreement
    val = rmtp.build_data(raw["data"], result.model).val
    assert agreement["held_out"] and agreement["images"] == min(256, len(val))  # the val split, not the 16
    assert agreement["where"] == f"{agreement['images']} held-out images (n:m calibrated on others)"


@pytest.mark.parametrize("held_out, message", [
    ("calibration", "held_out is the calibration loader, whose images the pruner calibrates on"),
    ("empty", "held_out has no images (an empty val split?)"),
    ("dataset", "held_out: give a DataLoader of images the pruner never sees (e.g. bundle.loader('val')), got "
                "TensorDataset"),
])
def test_a_held_out_that_cannot_be_held_out_is_refused_before_pruning(digits, held_out: str, message: str) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    model, calib = digits
    before = copy.deepcopy(model.state_dict())
    given = {"calibration": calib, "empty": DataLoader(TensorDataset(torch.zeros(0, 1, 32, 32))),
             "dataset": TensorDataset(torch.zeros(4, 1, 32, 32))}[held_out]
    with pytest.raises(RecipeError, match=re.escape(message)):
        rmtp.prune(model, "n:m", calibration=calib, held_out=given, n=2, m=4, score="wanda", budget="uniform",
                   only_if_faster=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing pruned


def test_a_budget_only_the_weak_end_meets_warns_that_the_step_barely_pruned(digits) -> None:
    model, calib = digits
    report = rmtp.prune(copy.deepcopy(model), "magnitude", sparsity=0.9, calibration=calib,
                        accuracy_budget={"max_drop": 0.001, "evaluations": 2})
    assert report.agreement["budget"]["outcome"] == "weakest" and report.agreement["budget"]["chosen"] == 0.0
    assert report.warnings == ["accuracy budget max_drop 0.1% (agreement ≥ 99.9%): only magnitude's weakest "
                               "setting, sparsity = 0, is within it (100.0% agreement); that was applied, so the step "
                               "prunes as little as it can: loosen the budget for a stronger cut"]


def test_without_calibration_nothing_is_scored_and_a_budget_is_refused(digits) -> None:
    model, _ = digits
    report = rmtp.prune(copy.deepcopy(model), "magnitude", sparsity=0.3)
    assert report.agreement is None and report.warnings == []
    with pytest.raises(RecipeError, match=r"accuracy_budget: .*pass calibration="):
        rmtp.prune(copy.deepcopy(model), "magnitude", accuracy_budget={"max_drop": 0.1})


def test_a_recipe_step_with_a_budget_scores_on_the_calibration_split(tmp_path) -> None:
    raw = _budget_recipe({"max_drop": 0.2, "evaluations": 3}, params={"r": 4})
    raw["data"]["calibration_size"] = 16
    result = rmtp.run_recipe(parse_recipe(raw))
    step = result.report.steps[0]
    assert step.agreement["budget"]["knob"] == "r" and step.agreement["images"] == 16
    assert step.agreement["budget"]["chosen"] <= 4


def _rendered(report: StepReport) -> str:
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    render_step(report, console)
    return console.export_text()


def test_a_loader_with_a_subset_sampler_holds_out_only_images_it_yields() -> None:
    """A calibration loader that samples a subset of a bigger dataset: the split is over what the
    loader yields (its 40 images), never over the whole dataset."""
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    from rmtp.fidelity.agreement import split_calibration

    images = torch.arange(200, dtype=torch.float32).view(200, 1, 1, 1).expand(200, 1, 2, 2).clone()
    dataset = TensorDataset(images, torch.zeros(200, dtype=torch.long))
    chosen = list(range(100, 140))
    loader = DataLoader(dataset, batch_size=8, sampler=SubsetRandomSampler(chosen, generator=torch.Generator()
                                                                          .manual_seed(0)))
    split = split_calibration(loader, 0.25, seed=0, minimum=8)
    held = {int(x) for x in split.held_out[:, 0, 0, 0]}
    fit = {int(x) for batch in split.fit for x in batch[0][:, 0, 0, 0]}
    assert held | fit == set(chosen) and not held & fit and len(held) == 10


def test_too_few_calibration_images_for_a_budget_are_refused_by_validate(tmp_path) -> None:
    from conftest import tiny_recipe, write_recipe

    from rmtp.errors import RecipeError
    from rmtp.run.recipe import load_recipe

    recipe = tiny_recipe([{"prune": "n:m", "params": {"n": 2, "m": 4, "score": "wanda", "budget": "mp",
                                                      "target_macs": 0.8},
                           "accuracy_budget": {"max_drop": 0.05}}])
    recipe["data"]["calibration_size"] = 8
    with pytest.raises(RecipeError, match=r"data.calibration_size: 8 calibration images are too few .* at least 9"):
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))


def test_spp_searches_its_path_once_per_step_and_prunes_as_if_it_searched_per_candidate(digits, monkeypatch) -> None:
    """A budget's candidates differ only in the level they slice: spp's LBI path (its costly part)
    is searched once and reused, by every candidate and the final prune, with the weights a search
    per candidate gives."""
    import rmtp_plugins.spp.pruner as spp_pruner

    model, calib = digits
    dense = rmtp.frozen_copy(model)
    searched: list[int] = []
    original = spp_pruner.search

    def counting(ctx, units, params):
        searched.append(len(units))
        return original(ctx, units, params)

    monkeypatch.setattr(spp_pruner, "search", counting)

    def run() -> tuple[torch.nn.Module, StepReport]:
        pruned = copy.deepcopy(model)
        report = rmtp.prune(pruned, "spp", ratio=0.5, steps=6, batch_size=12, calibration=calib, dense=dense,
                            accuracy_budget={"max_drop": 0.2, "evaluations": 4})
        return pruned, report

    cached, report = run()
    assert len(searched) == 1 and len(report.agreement["budget"]["trials"]) >= 2
    searched.clear()
    monkeypatch.setattr(spp_pruner, "_step_search", lambda ctx, units, params: counting(ctx, units, params))
    uncached, again = run()  # the old way: every candidate and the final prune searched
    assert len(searched) == len(again.agreement["budget"]["trials"]) + 1
    assert again.agreement == report.agreement
    want, got = uncached.state_dict(), cached.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0, msg=key)
