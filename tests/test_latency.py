"""rmtp.latency: the cost table and its cache, grids and interpolation, the cost models, and the
speed decisions they drive (svd-mp only_if_faster / target_speedup, recipe plumbing, reports).

No test asserts a timing: which layer is faster is decided here by injected or MAC-based cost
models; the measured path is only checked for what it writes and reports (speed claims are
benchmarks, ``benchmarks/latency_budgets.py``, not tests).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_VIT, tiny_recipe, write_recipe
from torch import nn

import rmtp
from rmtp.api import frozen_copy
from rmtp.contract.pruner import PruneContext
from rmtp.errors import RecipeError
from rmtp.latency import LatencySettings
from rmtp.latency import cost as cost_module
from rmtp.latency.cost import (
    CostModel,
    MacsCost,
    MeasuredCost,
    cost_model,
    interpolate,
    monotone,
    rank_grid,
    round_up,
)
from rmtp.latency.table import FORMAT_VERSION, CostTable, LatencyError, device_name, module_key, table_path
from rmtp.latency.target import speed_target
from rmtp.plugins import get_plugins
from rmtp.reports.records import StepReport
from rmtp.run.recipe import load_recipe
from rmtp_plugins.svd_mp import SvdMpParams, SvdMpPruner
from rmtp_plugins.svd_mp.lowrank import LOW_RANK_TYPES, LowRankLinear

CPU = torch.device("cpu")


def _measured(tmp_path: Path, **settings) -> LatencySettings:
    """Measured cost with the shortest timing the settings allow (nothing here asserts a time)."""
    return LatencySettings(**{"cost": "measured", "rounds": 3, "block_ms": 2, "threads": 1, "cache": tmp_path,
                              **settings})


def _two_linears() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(32, 32), nn.Linear(32, 8)]


# ---------------------------------------------------------------------------------- cost table / cache

def test_measured_costs_are_cached_per_device_precision_batch_threads(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    first = MeasuredCost(_measured(tmp_path), CPU, (32,))
    times = first.seconds(_two_linears(), (4, 32), what="pair")
    assert len(times) == 2 and all(t > 0 and math.isfinite(t) for t in times) and first.timed == 2
    files = sorted(tmp_path.glob("*.json"))
    assert files == [table_path(tmp_path, device_name(CPU), "fp32", 1, 1)] == [first.table.path]
    slug = files[0].name
    assert slug.endswith("-fp32-b1-t1.json") and len(slug) > len("-fp32-b1-t1.json")  # device slug first
    data = json.loads(files[0].read_text(encoding="utf-8"))
    assert data["header"] == {"device": device_name(CPU), "torch": torch.__version__, "precision": "fp32",
                              "batch": 1, "threads": 1}
    keys = [module_key(m, (4, 32)) for m in _two_linears()]
    assert sorted(data["entries"]) == sorted(keys)
    assert [data["entries"][k]["seconds"] for k in keys] == times

    def no_timing(*args, **kwargs):
        raise AssertionError("a cached cost was timed again")

    monkeypatch.setattr(cost_module, "interleaved_timing", no_timing)
    second = MeasuredCost(_measured(tmp_path), CPU, (32,))  # a fresh process would start like this
    assert second.seconds(_two_linears(), (4, 32)) == times and second.timed == 0
    with pytest.raises(AssertionError, match="timed again"):  # the patch is live: a new layer would be timed
        second.seconds([nn.Linear(32, 16)], (4, 32))
    monkeypatch.undo()

    other = MeasuredCost(_measured(tmp_path, batch=2), CPU, (32,))
    assert other.table.path != first.table.path and other.table.path.name.endswith("-fp32-b2-t1.json")
    assert other.table.entries == {}  # batch 1's entries are not batch 2's
    other.seconds(_two_linears(), (4, 32))
    assert other.timed == 2 and len(list(tmp_path.glob("*.json"))) == 2


def test_corrupt_table_is_refused_with_its_path(tmp_path: Path) -> None:
    path = table_path(tmp_path, device_name(CPU), "fp32", 1, 1)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(LatencyError, match="unreadable") as info:
        MeasuredCost(_measured(tmp_path), CPU, (32,))
    assert str(path) in str(info.value) and "delete it" in str(info.value)
    path.write_text(json.dumps({"header": {}, "entries": [1, 2]}), encoding="utf-8")  # parses, wrong shape
    with pytest.raises(LatencyError, match="entries is not a mapping"):
        CostTable.open(path, {})


@pytest.mark.parametrize("entry", [0.5, None, {"seconds": None}, {"seconds": "1"}, {"seconds": float("nan")},
                                   {"seconds": -1.0}, {"seconds": True}, {"what": "x"}, {"seconds": 10**400}])
def test_a_table_whose_entries_have_the_wrong_shape_is_refused_not_a_traceback(tmp_path: Path, entry) -> None:
    path = tmp_path / "cpu-fp32-b1-t1.json"
    path.write_text(json.dumps({"format_version": FORMAT_VERSION, "header": {"device": "cpu"},
                                "entries": {"good": {"seconds": 1e-3, "what": "x"}, "bad": entry}}), encoding="utf-8")
    with pytest.raises(LatencyError, match=r"unreadable \(entry 'bad' is not .*delete it to measure again"):
        CostTable.open(path, {"device": "cpu"})


def test_a_table_of_another_format_version_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "cpu-fp32-b1-t1.json"
    path.write_text(json.dumps({"format_version": FORMAT_VERSION + 1, "header": {"device": "cpu"},
                                "entries": [["k", 1.0], "a later layout"]}), encoding="utf-8")
    assert CostTable.open(path, {"device": "cpu"}).entries == {}


def test_a_table_that_cannot_be_written_is_one_line_naming_it(tmp_path: Path) -> None:
    """A folder above the table that is a file: one LatencyError line with the path and the OS
    error, not a traceback, and nothing created."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file")
    table = CostTable(blocker / "cpu-fp32-b1-t1.json", {"device": "cpu"}, {"k": {"seconds": 1.0, "what": "x"}})
    with pytest.raises(LatencyError) as info:
        table.save()
    message = str(info.value)
    assert message.startswith(f"latency cost table {table.path}: could not write it (")
    assert f"({blocker} is a file, not a folder)" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"] and blocker.read_text() == "a file"


def test_a_table_write_that_fails_midway_keeps_the_previous_table_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    import errno

    import rmtp.storage.atomic as atomic

    table = CostTable(tmp_path / "cpu-fp32-b1-t1.json", {"device": "cpu"})
    table.record("a", 1.0, "first")
    table.save()
    before = table.path.read_text(encoding="utf-8")

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", src)

    monkeypatch.setattr(atomic.os, "replace", full_disk)  # the temp file is written, the rename fails
    table.record("b", 2.0, "second")
    with pytest.raises(LatencyError, match=r"could not write it \(No space left on device\); free some space"):
        table.save()
    assert table.path.read_text(encoding="utf-8") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [table.path.name]


def test_table_of_other_settings_starts_empty(tmp_path: Path) -> None:
    cost = MeasuredCost(_measured(tmp_path), CPU, (32,))
    cost.seconds(_two_linears(), (4, 32))
    path = cost.table.path
    data = json.loads(path.read_text(encoding="utf-8"))
    data["header"]["torch"] = "0.0.0-another-torch"
    path.write_text(json.dumps(data), encoding="utf-8")
    again = MeasuredCost(_measured(tmp_path), CPU, (32,))
    assert again.table.entries == {}
    again.seconds(_two_linears(), (4, 32))
    assert again.timed == 2  # re-measured, and the file now carries this torch's header
    assert json.loads(path.read_text(encoding="utf-8"))["header"]["torch"] == torch.__version__


def test_module_key_names_what_was_timed() -> None:
    a, b = nn.Linear(32, 32), nn.Linear(32, 32)
    assert module_key(a, (4, 32)) == module_key(b, (4, 32))  # weights do not matter, shapes do
    assert module_key(a, (4, 32)) != module_key(a, (8, 32))
    assert module_key(a, (4, 32)) != module_key(nn.Linear(32, 64), (4, 32))
    assert module_key(a, (4, 32)) != module_key(nn.Linear(32, 32, bias=False), (4, 32))
    assert module_key(a, (4, 32)) != module_key(nn.Linear(32, 32).double(), (4, 32))
    assert module_key(LowRankLinear(32, 4, 32), (4, 32)) != module_key(LowRankLinear(32, 8, 32), (4, 32))
    assert module_key(LowRankLinear(32, 4, 32), (4, 32)) == module_key(LowRankLinear(32, 4, 32), (4, 32))
    from timm.models.vision_transformer import Attention

    assert repr(Attention(32, num_heads=2)) == repr(Attention(32, num_heads=4))  # why heads are keyed
    assert module_key(Attention(32, num_heads=2), (1, 17, 32)) != module_key(Attention(32, num_heads=4), (1, 17, 32))


# ---------------------------------------------------------------------------------- grids

def test_interpolate_exact_linear_and_extended() -> None:
    xs, ys = [1, 3, 5], [10.0, 30.0, 20.0]
    assert [interpolate(xs, ys, x) for x in xs] == ys
    assert interpolate(xs, ys, 2) == pytest.approx(20.0)
    assert interpolate(xs, ys, 4) == pytest.approx(25.0)
    assert interpolate(xs, ys, 0) == pytest.approx(0.0)  # first segment's slope (10/unit) below the grid
    assert interpolate(xs, ys, 7) == pytest.approx(10.0)  # last segment's slope (-5/unit) above it
    assert interpolate([4], [2.5], 100) == 2.5
    with pytest.raises(ValueError):
        interpolate([1, 2], [1.0], 1)


def test_rank_grid_round_up_and_monotone() -> None:
    grid = rank_grid(1, 40, 5)
    assert grid == sorted(set(grid)) and grid[0] == 1 and grid[-1] == 40 and len(grid) == 5
    assert all(1 <= g <= 40 for g in grid)
    rounded = rank_grid(1, 40, 5, round_to=8)
    assert rounded == sorted(set(rounded)) and rounded[-1] == 40
    assert all(g % 8 == 0 or g == 40 for g in rounded) and all(1 <= g <= 40 for g in rounded), rounded
    assert all(g % 16 == 0 or g == 20 for g in rank_grid(3, 20, 4, round_to=16))
    assert rank_grid(7, 7, 5) == [7]
    with pytest.raises(ValueError):
        rank_grid(5, 4, 3)
    assert [round_up(v, 8, 40) for v in (1, 8, 9, 33, 39)] == [8, 8, 16, 40, 40]
    assert round_up(13, None, 40) == 13 and round_up(50, None, 40) == 40 and round_up(17, 8, 20) == 20
    assert monotone([3.0, 1.0, 4.0, 2.0, 5.0]) == [3.0, 3.0, 4.0, 4.0, 5.0]
    assert monotone([]) == []


# ---------------------------------------------------------------------------------- cost models

def test_unknown_device_is_refused_for_measured_cost_only() -> None:
    meta = torch.device("meta")
    with pytest.raises(LatencyError, match="'meta'") as info:
        cost_model(LatencySettings(cost="measured"), meta, (1, 8, 8))
    assert "cpu or cuda" in str(info.value) and "cost: macs" in str(info.value)
    assert isinstance(cost_model(LatencySettings(cost="macs"), meta, (1, 8, 8)), MacsCost)


def test_target_latency_ms_needs_measured_cost() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    ctx = PruneContext(model=model, arch=get_plugins().architecture("vit"), layers=[], device=CPU, seed=0,
                       input_shape=(8,), latency=LatencySettings(cost="macs"))
    assert ctx.cost_model() is ctx.cost_model() and ctx.cost_model().kind == "macs"  # built once, shared
    with pytest.raises(LatencyError, match="target_latency_ms .* needs latency.cost: measured"):
        speed_target(ctx, None, 5.0)
    assert speed_target(ctx, 2.0, None).target_speedup == 2.0


class _TimedAs(nn.Module):
    """A stand-in model whose whole-model time is given: what the per-layer figures cannot see."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds


class _ClockCost:
    """A cost model that reads a stand-in model's time off it (deterministic, nothing timed)."""

    kind = "injected"

    def model_seconds(self, models: Sequence[nn.Module]) -> list[float]:
        return [m.seconds for m in models]


def _ten_second_model(speedup: float | None = 1.5):
    """A 10 s dense model to be made ``speedup`` × faster: the target, and a context whose models
    are timed by :class:`_ClockCost`. Candidate c saves c seconds by the per-layer figures."""
    from types import SimpleNamespace

    from rmtp.latency.target import SpeedTarget
    from rmtp.run.progress import NULL_PROGRESS

    target = SpeedTarget(cost=_ClockCost(), target_speedup=speedup, target_latency_ms=None, dense=10.0, now=10.0,
                         goal=None if speedup is None else 10.0 / speedup)
    ctx = SimpleNamespace(dense_model=_TimedAs(10.0), model=_TimedAs(10.0), progress=NULL_PROGRESS)
    return target, ctx


def _timed_builds(seconds):
    """A ``build`` whose candidate c's model takes ``seconds(c, checks so far)``, and the list of the c built."""
    built: list[int] = []

    def build(c: int) -> nn.Module:
        built.append(c)
        return _TimedAs(seconds(c, len(built)))

    return build, built


def test_reach_checked_redoes_the_search_with_what_the_whole_model_shows() -> None:
    """Each candidate's real model also pays a constant 2 s the figures miss. ×1.5 means ≤ 6.67 s:
    the figures alone choose c = 4 (6 s), which really takes 8 s; one correction learns the 2 s
    and moves to c = 6, which holds."""
    from rmtp.latency.target import CORRECTIONS, reach_checked

    figures = lambda c: [float(c)]  # noqa: E731
    target, ctx = _ten_second_model()
    build, built = _timed_builds(lambda c, _: 10.0 - c + 2.0)
    assert reach_checked(ctx, target, list(range(10)), figures, build) == 6
    assert built == [4, 6]  # the choice held after the second check
    assert target.miss([6.0]) == pytest.approx(2.0) and target.speedup([6.0]) == pytest.approx(10 / 6)
    assert "+20.0% of dense time" in target.correction_note([6.0], "it")
    # no goal (a params budget timed for the report): nothing is built or timed
    untargeted, _ = _ten_second_model(None)
    assert reach_checked(ctx, untargeted, list(range(10)), figures, build) == 9 and built == [4, 6]
    # a machine whose miss flips between checks never lets the choice hold: the search stops after
    # CORRECTIONS checks; its choice after the last one (6) was never timed, so the plan kept is
    # the gentlest one timed that reached the target (7: 1 s; 4 and 5 took 9 s and 8 s)
    assert CORRECTIONS == 3
    flipping, _ = _ten_second_model()
    build, built = _timed_builds(lambda c, checks: 10.0 - c + (3.0 if checks % 2 else -2.0))
    assert reach_checked(ctx, flipping, list(range(10)), figures, build) == 7
    assert built == [4, 7, 5]
    assert flipping.fallback == ("the search's last choice was not timed whole: kept the gentlest plan timed "
                                 "that reached the target instead (measured ×10.00)")


def test_reach_checked_reads_a_growing_miss_off_the_plans_timed() -> None:
    """The figures overstate every saving by half: candidate c really takes 10 − c/2 s, so ×1.5
    (≤ 6.67 s) needs c = 7. A constant miss (the mean of the checks) would settle on c = 6 (7 s,
    short of the target); the miss read off the checks, linear in the saving, reaches c = 7."""
    from rmtp.latency.target import reach_checked

    target, ctx = _ten_second_model()
    build, built = _timed_builds(lambda c, _: 10.0 - c / 2)
    assert reach_checked(ctx, target, list(range(10)), lambda c: [float(c)], build) == 7
    assert built == [4, 6, 7]
    assert target.predicted([7.0]) == pytest.approx(6.5)  # exact where it was timed
    assert target.miss([5.0]) == pytest.approx(2.5)  # linear between the checks (2 at 4, 3 at 6)
    assert target.miss([0.0]) == pytest.approx(2.0) and target.miss([9.0]) == pytest.approx(3.5)  # constant beyond


def test_macs_cost_counts_multiply_accumulates() -> None:
    cost = MacsCost(LatencySettings(cost="macs"), CPU, (64,))
    assert cost.seconds([nn.Linear(64, 32)], (10, 64)) == [10 * 64 * 32]
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    dense = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
    macs = MacsCost(LatencySettings(cost="macs", batch=3), CPU, (16,))
    assert macs.model_seconds([model, dense]) == [3 * (16 * 32 + 32 * 8), 3 * (16 * 64 + 64 * 8)]
    assert macs.in_context(dense, model, ["0"]) == (3 * (16 * 64 + 64 * 8), 3 * (16 * 32 + 32 * 8), 3 * 16 * 32)
    assert macs.in_context(model, model, ["0", "2"]) == (3 * 768, 3 * 768, 3 * 768)
    assert macs.describe() == "macs on cpu, batch 3, fp32"


# ---------------------------------------------------------------------------------- svd-mp only_if_faster

class _FixedCost(CostModel):
    """A cost model that says what it is told: 1.0 per dense Linear call, ``low_rank`` per split;
    whole models 10.0, ``split_model`` with split layers in them."""

    kind = "measured"

    def __init__(self, low_rank: float, input_shape: tuple[int, ...], split_model: float = 9.0):
        super().__init__(LatencySettings(cost="measured"), CPU, input_shape)
        self.low_rank = low_rank
        self.split_model = split_model
        self.calls: list[list[str]] = []

    def seconds(self, modules: Sequence[nn.Module], input_shape: tuple[int, ...], what: str = "") -> list[float]:
        self.calls.append([type(m).__name__ for m in modules])
        return [self.low_rank if isinstance(m, LOW_RANK_TYPES) else 1.0 for m in modules]

    def _model_seconds(self, models: Sequence[nn.Module]) -> list[float]:
        # the copy with the timed layers stubbed takes 8.0: the layers are 2.0 of the model's 10.0
        def seconds(model: nn.Module) -> float:
            kinds = {type(m) for m in model.modules()}
            return 8.0 if cost_module._Ready in kinds else self.split_model if kinds & set(LOW_RANK_TYPES) else 10.0

        return [seconds(m) for m in models]


def _planted(rows: int, cols: int, spikes: list[float], sigma: float = 0.02, seed: int = 0) -> torch.Tensor:
    """Signal directions of strength θ (in units of the BBP threshold) plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    threshold = sigma * (rows * cols) ** 0.25
    u = torch.linalg.qr(torch.randn(rows, len(spikes), generator=g))[0]
    v = torch.linalg.qr(torch.randn(cols, len(spikes), generator=g))[0]
    return (u * torch.tensor(spikes) * threshold) @ v.T + sigma * torch.randn(rows, cols, generator=g)


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(120, 200)
        self.b = nn.Linear(200, 60)
        with torch.no_grad():
            self.a.weight.copy_(_planted(200, 120, [4.0, 3.0, 2.5]))  # rank 3: a split pays
            self.b.weight.copy_(_planted(60, 200, [5.0], seed=1))     # rank 1

    def forward(self, x):
        return self.b(self.a(x))


def _context(model: nn.Module, cost: CostModel | None) -> PruneContext:
    from rmtp.contract.architecture import PrunableLayer

    arch = get_plugins().architecture("vit")  # only its qkv_split is consulted, and these are not qkv
    return PruneContext(model=model, arch=arch, layers=[PrunableLayer(n, "fc1") for n in ("a", "b")],
                        device=CPU, seed=0, input_shape=(120,), cost=cost)


def test_only_if_faster_keeps_a_slower_split_dense() -> None:
    model = _TwoLayers()
    before = {n: model.get_submodule(n).weight.detach().clone() for n in ("a", "b")}
    cost = _FixedCost(low_rank=5.0, input_shape=(120,))
    ctx = _context(model, cost)
    result = SvdMpPruner().prune(ctx, SvdMpParams())
    rows = result.rows  # only_if_faster: default on
    assert cost.calls and all(call[0] == "Linear" and set(call[1:]) == {"LowRankLinear"} for call in cost.calls)
    for row, name in zip(rows, ("a", "b")):
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, before[name])  # not even reconstructed
        assert row.note.startswith("dense, unchanged (split not faster: ×0.20 of dense speed predicted")
        assert "needs ×1.05" in row.note  # min_gain 0.05 of a measured cost
        assert row.detail["split speed"] == "×0.20" and row.params_after == row.params_before
    assert [r.kept_rank for r in rows] == [3, 1]
    assert result.speed_plan is not None and result.speed_plan["predicted_speedup"] == pytest.approx(1.0)


def test_only_if_faster_splits_a_faster_split() -> None:
    model = _TwoLayers()
    ctx = _context(model, _FixedCost(low_rank=0.2, input_shape=(120,)))
    result = SvdMpPruner().prune(ctx, SvdMpParams())
    rows = result.rows
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in ("a", "b"))
    assert [r.note for r in rows] == ["split", "split"] and rows[0].detail["split speed"] == "×5.00"
    # both layers save 0.8 of 1.0 alone; in the model they weigh 2.0 of 10.0 (scale 1): 10 / (10 - 1.6)
    # by the figures, corrected by timing the split model whole (9.0): 10 / 9
    assert result.speed_plan["predicted_speedup"] == pytest.approx(10 / 9)
    assert result.speed_plan["in_context_scale"] == pytest.approx(1.0)
    assert "prediction corrected by timing the pruned model" in result.speed_plan["note"]


def test_only_if_faster_keeps_dense_when_the_split_model_measures_slower() -> None:
    """Each split is 5× faster alone, but the split model measures 12.0 against the dense 10.0
    (×0.83): it is not kept; every layer stays dense and unchanged, and the report says why."""
    model = _TwoLayers()
    before = {n: model.get_submodule(n).weight.detach().clone() for n in ("a", "b")}
    ctx = _context(model, _FixedCost(low_rank=0.2, input_shape=(120,), split_model=12.0))
    result = SvdMpPruner().prune(ctx, SvdMpParams())
    rows = result.rows
    for row, name in zip(rows, ("a", "b")):
        assert type(model.get_submodule(name)) is nn.Linear and torch.equal(model.get_submodule(name).weight,
                                                                             before[name])
        assert row.note == "dense, unchanged (the split model, timed whole, was not faster: see the step's notes)"
    assert result.speed_plan["predicted_speedup"] == 1.0  # the model is unchanged: ×1.00, no correction applied
    assert result.speed_plan["note"] == ("no plan timed whole was faster than the model as it came (×1.00 over "
                                         "dense): the fastest measured ×0.83; the step keeps the model unchanged")


def test_only_if_faster_off_splits_even_when_told_slower() -> None:
    model = _TwoLayers()
    cost = _FixedCost(low_rank=5.0, input_shape=(120,))
    ctx = _context(model, cost)
    result = SvdMpPruner().prune(ctx, SvdMpParams(only_if_faster=False))
    rows = result.rows
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in ("a", "b"))
    assert [r.note for r in rows] == ["split", "split"] and cost.calls == [] and result.speed_plan is None


def test_svd_mp_speed_params_validation() -> None:
    assert SvdMpParams(target_params=0.5).faster_only() is False  # a params budget: no timing
    assert SvdMpParams(target_params=0.5, only_if_faster=True).faster_only() is True
    assert SvdMpParams().faster_only() is True
    with pytest.raises(ValueError, match="give one budget, not target_params and target_speedup"):
        SvdMpParams(target_params=0.5, target_speedup=2.0)
    with pytest.raises(ValueError, match="give one budget, not target_speedup and target_latency_ms"):
        SvdMpParams(target_speedup=2.0, target_latency_ms=3.0)
    with pytest.raises(ValueError, match="target_speedup splits only layers that are faster"):
        SvdMpParams(only_if_faster=False, target_speedup=2.0)
    SvdMpParams(only_if_faster=False, target_params=0.5)  # a params budget may split slower layers


# ---------------------------------------------------------------------------------- svd-mp target_speedup

def _vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()


@pytest.fixture(scope="module")
def vit_runs() -> dict[float, tuple[StepReport, nn.Module]]:
    """svd-mp target_speedup on the tiny ViT under the suite's cost: macs, one dense model for all."""
    base = _vit()
    dense = frozen_copy(base)
    runs = {}
    for target in (1.2, 2.0, 3.0, 50.0):
        model = _vit()
        model.load_state_dict(base.state_dict())
        runs[target] = (rmtp.prune(model, "svd-mp", target_speedup=target, dense=dense), model)
    return runs


def test_target_speedup_is_reached_by_macs(vit_runs) -> None:
    totals = []
    for target in (1.2, 2.0, 3.0):
        report, _ = vit_runs[target]
        speed = report.speed
        assert speed["target_speedup"] == target and speed["predicted_speedup"] >= target
        assert speed["cost"] == "macs on cpu, batch 1, fp32" and "measured" not in speed
        assert speed["start_speedup"] == pytest.approx(1.0)
        # Under cost: macs the prediction is the real MAC ratio, not an approximation of it: the
        # in-context share of the layers is their own MAC count (scale 1), a split's MACs are
        # tokens·k·(M+N), linear in the total rank, so the grid's interpolation is exact, and the
        # dense and pruned counts hold the same attention / patch-embed / head MACs. Only float
        # rounding is left.
        assert report.baseline.macs / report.stats.macs == pytest.approx(speed["predicted_speedup"], rel=1e-9)
        assert any(n.startswith("speed: predicted ×") for n in report.notes)
        totals.append(sum(r.kept_rank for r in report.rows))
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)  # faster: fewer ranks
    macs = [vit_runs[t][0].stats.macs for t in (1.2, 2.0, 3.0)]
    assert macs == sorted(macs, reverse=True)


def test_unreachable_target_gives_the_most_compressed_ranks(vit_runs) -> None:
    report, model = vit_runs[50.0]
    assert any("target ×50.00 not reachable" in n for n in report.notes)
    assert report.speed["predicted_speedup"] < 50
    assert report.speed["predicted_speedup"] > vit_runs[3.0][0].speed["predicted_speedup"]
    for row in report.rows:
        module = model.get_submodule(row.layer)
        assert isinstance(module, LOW_RANK_TYPES)
        assert list(getattr(module, "ranks", [getattr(module, "rank", None)])) == [1] * (3 if "qkv" in row.layer else 1)


def test_step_report_round_trips_speed(vit_runs) -> None:
    report, _ = vit_runs[2.0]
    data = json.loads(json.dumps(report.to_dict()))
    back = StepReport.from_dict(data)
    assert back.speed == report.speed and back.speed["predicted_speedup"] >= 2.0
    assert StepReport.from_dict({k: v for k, v in data.items() if k != "speed"}).speed is None


def test_target_speedup_with_round_to_keeps_gemm_friendly_ranks() -> None:
    model = _vit()
    report = rmtp.prune(model, "svd-mp", target_speedup=2.0, dense=frozen_copy(model), latency={"round_to": 8})
    assert report.speed["predicted_speedup"] >= 2.0
    assert report.baseline.macs / report.stats.macs == pytest.approx(report.speed["predicted_speedup"], rel=1e-9)
    ranks = [k for row in report.rows if isinstance(m := model.get_submodule(row.layer), LOW_RANK_TYPES)
             for k in getattr(m, "ranks", [getattr(m, "rank", None)])]
    assert ranks and all(k % 8 == 0 for k in ranks), ranks


# ---------------------------------------------------------------------------------- recipe plumbing

def test_recipe_latency_takes_batch_and_threads_from_the_timed_evaluate(tmp_path: Path) -> None:
    timed = {"evaluate": {"latency": True, "latency_batch": 8, "latency_threads": 1}}
    recipe = load_recipe(write_recipe(tmp_path / "a.yaml", tiny_recipe([{"prune": "svd-mp"}, timed])))
    latency = recipe.resolved[0].latency
    assert latency.batch == 8 and latency.threads == 1
    recipe = load_recipe(write_recipe(tmp_path / "b.yaml", tiny_recipe(
        [{"prune": "svd-mp", "latency": {"batch": 2}}, timed])))
    assert recipe.resolved[0].latency.batch == 2 and recipe.resolved[0].latency.threads == 1
    recipe = load_recipe(write_recipe(tmp_path / "c.yaml", tiny_recipe(
        [{"prune": "svd-mp"}, {"evaluate": {"latency": False, "latency_batch": 8}}])))
    assert recipe.resolved[0].latency.batch == 1  # an evaluate that times nothing says nothing
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path / "d.yaml", tiny_recipe([{"prune": "svd-mp", "latency": {"batchh": 2}}])))
    message = str(info.value)
    assert "steps[0].latency.batchh: unknown key 'batchh'" in message and "\n" not in message.strip()


# ---------------------------------------------------------------------------------- measured, end to end

def test_measured_end_to_end_reports_measured_next_to_predicted(tmp_path: Path) -> None:
    model = _vit()
    latency = {"cost": "measured", "batch": 2, "threads": 1, "rounds": 3, "block_ms": 2, "verify_rounds": 3,
               "cache": str(tmp_path)}
    report = rmtp.prune(model, "svd-mp", latency=latency)
    speed = report.speed
    assert speed["measured"]["ratio"]["median"] > 0 and speed["measured"]["ratio"]["n"] == 3
    assert math.isfinite(speed["prediction_error"]) and speed["cost"].startswith("measured on cpu, batch 2")
    assert any(n.startswith("speed:") and "measured ×" in n for n in report.notes)
    assert [p.name for p in tmp_path.glob("*.json")] and all(p.name.endswith("-fp32-b2-t1.json")
                                                             for p in tmp_path.glob("*.json"))
    # every row either split or says why it stayed dense (not faster alone, or the split model not
    # faster whole: which one depends on the machine), with its predicted ratio
    for row in report.rows:
        assert row.note.startswith(("split", "dense, unchanged (split not faster: ×",
                                    "dense, unchanged (the split model, timed whole, was not faster")), row.note
        assert "split speed" in row.detail


# ---------------------------------------------------------------------------------- nothing kept slower (#23)

def test_reach_checked_keeps_the_model_unchanged_when_every_plan_timed_is_slower() -> None:
    """Every plan really pays 2 s per unit the figures say it saves (tome's r = 32 measured ×0.44):
    the plans timed (4, then the strongest, 9) are slower than the model as it came, so none is kept."""
    from rmtp.latency.target import reach_checked

    target, ctx = _ten_second_model()
    build, built = _timed_builds(lambda c, _: 10.0 + c)
    assert reach_checked(ctx, target, list(range(10)), lambda c: [float(c)], build) is None
    assert built == [4, 9]
    assert target.fallback == ("no plan timed whole was faster than the model as it came (×1.00 over dense): the "
                               "fastest measured ×0.71; the step keeps the model unchanged")
    assert target.speedup([]) == 1.0  # the unchanged model: ×1.00, whatever the checks missed


def test_unreachable_target_keeps_the_fastest_plan_measured_not_the_most_compressed() -> None:
    """Plans save half what the figures say up to c = 7 (6.5 s, ×1.54) and get slower beyond it
    (c = 9 takes 8 s): ×3 is out of reach, and the plan kept is 7, the fastest timed, not 9."""
    from rmtp.latency.target import reach_checked

    target, ctx = _ten_second_model(3.0)
    build, built = _timed_builds(lambda c, _: 10.0 - c / 2 if c <= 7 else 6.5 + 0.75 * (c - 7))
    assert reach_checked(ctx, target, list(range(10)), lambda c: [float(c)], build) == 7
    assert built == [7, 9]
    assert target.fallback == "the search's choice measured ×1.25 over dense: kept the fastest plan timed instead " \
                              "(measured ×1.54)"
    assert target.shortfall([7.0], "it") == "target ×3.00 not reachable by it: predicted ×1.54 for the plan kept"


class _NoisyCost(_FixedCost):
    """Each whole model in a session times 6 s slower than the one before: noise, on a busy machine."""

    def _model_seconds(self, models: Sequence[nn.Module]) -> list[float]:
        return [10.0 + 6.0 * i for i in range(len(models))]


def test_a_model_the_same_as_dense_is_timed_once_and_is_dense_speed() -> None:
    """The first step's model is a copy of dense: two timings of it differ by noise alone (an n:m
    step on a CPU printed ×0.62 for a model it left unchanged), so it is timed once: ×1.00."""
    from rmtp.latency.cost import same_structure
    from rmtp.latency.target import SpeedTarget

    model = _TwoLayers()
    dense = frozen_copy(model)
    cost = _NoisyCost(low_rank=1.0, input_shape=(120,))
    assert same_structure(model, dense) and cost.in_context(dense, model, [])[:2] == (10.0, 10.0)
    ctx = _context(model, cost)
    ctx.dense_model = dense
    target = SpeedTarget(cost=cost, target_speedup=None, target_latency_ms=None)
    target.calibrate(ctx, [], [])
    assert target.speedup([0.0]) == 1.0
    wider = _TwoLayers()
    wider.b = nn.Linear(200, 61)
    assert not same_structure(wider, dense) and cost.in_context(dense, wider, [])[:2] == (10.0, 16.0)


def test_in_context_scale_out_of_range_is_reported_as_a_measurement_error() -> None:
    """The stubbed copy times 6 s *slower* than the model here, and a layer cannot take 23.6× its
    time alone inside the model: such a scale is noise, not used, and the report says so."""
    from types import SimpleNamespace

    from rmtp.latency.target import SpeedTarget
    from rmtp.run.progress import NULL_PROGRESS

    class Share:  # a cost whose in-context share of the layers is 47.2 s of a 100 s model
        kind = "measured"
        settings = LatencySettings(cost="measured", batch=1)

        def in_context(self, dense, model, names):
            return 100.0, 100.0, 47.2

        def describe(self) -> str:
            return "measured"

    ctx = SimpleNamespace(dense_model=None, model=nn.Linear(2, 2), progress=NULL_PROGRESS)
    target = SpeedTarget(cost=Share(), target_speedup=None, target_latency_ms=None)
    target.calibrate(ctx, ["a"], [2.0])
    assert target.scale == 1.0
    plan = target.speed_plan([1.0])
    assert plan["in_context_scale"] == 1.0
    assert "took 23.6× their time alone inside the model, outside the sane ×0.25–×4: an error of the " \
           "measurement" in plan["note"]


def test_a_measured_target_without_a_latency_batch_says_which_batch_it_assumed() -> None:
    from rmtp.latency.target import SpeedTarget

    def note(settings: LatencySettings, speedup: float | None) -> str:
        cost = _FixedCost(low_rank=1.0, input_shape=(8,))
        cost.settings = settings
        return SpeedTarget(cost=cost, target_speedup=speedup, target_latency_ms=None, dense=1.0, now=1.0,
                           goal=None if speedup is None else 1.0 / speedup).speed_plan([])["note"]

    assert note(LatencySettings(cost="measured"), 1.5) == (
        "planned at batch 1, assumed: no latency.batch was given (nor a later timed evaluate step's "
        "latency_batch); set it to the batch the model will serve at")
    assert note(LatencySettings(cost="measured", batch=1), 1.5) == ""  # given: nothing assumed
    assert note(LatencySettings(cost="measured"), None) == ""  # no target: nothing planned at a batch


def test_a_prune_step_that_timed_on_a_busy_machine_warns_as_bench_does(monkeypatch) -> None:
    from rmtp.bench import environment
    from rmtp.run import steps

    monkeypatch.setattr(environment, "loadavg", lambda: 7.5)
    monkeypatch.setattr(environment, "usable_cores", lambda: 2)
    cost = _FixedCost(low_rank=1.0, input_shape=(8,))
    cost.threads = 2
    assert steps.busy_timing_note(cost, CPU, 1.0) == (
        "the machine was busy (1-min load 7.5 on 2 cores): timings are noisy; the step's speed choices and "
        "figures may be off: prune on an idle machine; try latency.threads: 1")
    assert steps.busy_timing_note(MacsCost(LatencySettings(cost="macs"), CPU, (8,)), CPU, 9.0) == ""  # not timed
    monkeypatch.setattr(environment, "loadavg", lambda: 1.0)
    assert steps.busy_timing_note(cost, CPU, 1.5) == ""  # idle


def test_a_bad_latency_cache_is_refused_before_any_timing(tmp_path: Path, monkeypatch) -> None:
    """RMTP_LATENCY_CACHE naming a file (or a read-only folder) crashed with a traceback after the
    timing; now rmtp.prune and recipe validation refuse it first, naming the variable and path."""
    from rmtp.errors import RmtpError

    cache = tmp_path / "cache-is-a-file"
    cache.write_text("")
    monkeypatch.setenv("RMTP_LATENCY_CACHE", str(cache))
    monkeypatch.setattr(MeasuredCost, "_interleaved", lambda *a, **k: pytest.fail("timed before the check"))
    with pytest.raises(RmtpError, match=f"^RMTP_LATENCY_CACHE: {cache}: is a file, not a folder$"):
        rmtp.prune(_vit(), "svd-mp", latency={"cost": "measured"})
    rmtp.prune(_vit(), "svd-mp", target_params=0.5, latency={"cost": "measured"})  # times nothing: no cache needed
    with pytest.raises(RecipeError, match=f"steps\\[0\\]: RMTP_LATENCY_CACHE: {cache}: is a file, not a folder"):
        load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(
            [{"prune": "svd-mp", "latency": {"cost": "measured"}}])))
    load_recipe(write_recipe(tmp_path / "m.yaml", tiny_recipe([{"prune": "svd-mp"}])))  # cost: macs writes none


class _PatchedSlow(CostModel):
    """Blocks time by tokens (1/100 s each), so the figures say fewer tokens is faster; but a
    token-reduced model times 20 s against the dense 10 s (its scoring and gather cost more)."""

    kind = "measured"

    def __init__(self):
        super().__init__(LatencySettings(cost="measured", batch=1), CPU, (1, 16, 16))

    def seconds(self, modules: Sequence[nn.Module], input_shape: tuple[int, ...], what: str = "") -> list[float]:
        return [input_shape[1] / 100 for _ in modules]

    def _model_seconds(self, models: Sequence[nn.Module]) -> list[float]:
        from rmtp.contract.saved_types import patches_of

        def seconds(model: nn.Module) -> float:
            stubbed = any(isinstance(m, cost_module._Ready) for m in model.modules())
            return 9.5 if stubbed else 20.0 if patches_of(model) else 10.0

        return [seconds(m) for m in models]


def test_the_step_reports_the_speed_plan_the_pruner_returns() -> None:
    """The prediction comes back in the pruner's result (:class:`rmtp.contract.pruner.PruneResult`), not
    written into its context: the step reads it there and reports it."""
    report = rmtp.prune(_vit(), "token-cls", target_speedup=1.2, latency={"cost": "macs"})
    assert report.speed is not None and report.speed["predicted_speedup"] >= 1.2 * (1 - 1e-6)
    assert report.speed["cost"].startswith("macs") and "r_max = " in report.speed["note"]
    assert any(note.startswith("speed: predicted ×") for note in report.notes)


def test_a_token_schedule_that_measures_slower_is_not_applied() -> None:
    """token-cls, target ×1.2, on a machine where the reduced model is slower than dense: the
    schedule timed whole is not kept; the model stays unpatched and the step says why."""
    from rmtp.contract.saved_types import patches_of
    from rmtp_plugins.tokens.token_cls import TokenClsParams, TokenClsPruner

    model = _vit()
    arch = get_plugins().architecture("vit")
    ctx = PruneContext(model=model, arch=arch, device=CPU, seed=0, input_shape=(1, 16, 16), cost=_PatchedSlow(),
                       layers=[layer for layer in arch.prunable_layers(model) if not layer.optional])
    result = TokenClsPruner().prune(ctx, TokenClsParams(target_speedup=1.2))
    assert result.rows == []
    assert not patches_of(model) and result.speed_plan["predicted_speedup"] == 1.0
    assert "no r_max chosen for the speed target" in result.speed_plan["note"]
    assert "the fastest measured ×0.50; the step keeps the model unchanged" in result.speed_plan["note"]
