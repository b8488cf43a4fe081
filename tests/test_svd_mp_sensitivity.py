"""svd-mp ``allocation: sensitivity`` (ASVD's measurement, a knapsack allocation): the allocation
against enumeration on an injected table, the measurement on a tiny ViT (weights restored, a
planted inert branch cut first), the params budget met, once per step under an accuracy budget,
the notes and the refusals."""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import timm
import torch
from conftest import TINY_VIT
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rmtp
from rmtp.errors import RmtpError
from rmtp_plugins.svd_mp import SvdMpParams, SvdMpPruner
from rmtp_plugins.svd_mp import sensitivity as sensitivity_module
from rmtp_plugins.svd_mp.sensitivity import RATIOS, Option


def _tiny_vit(depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY_VIT, "depth": depth}).eval()


def _loader(count: int = 48) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(count, 1, 16, 16, generator=g), torch.zeros(count, dtype=torch.long)),
                      batch_size=16)


def _rows(report) -> dict:
    return {row.layer: row for row in report.rows}


def _kl(seed: int, name: str, ratio: float) -> float:
    """A stand-in KL: falling with the share, at a seeded random rate per layer (the shape measured
    ones have), with a little seeded noise per share."""
    g = torch.Generator().manual_seed(seed * 1000 + zlib.crc32(name.encode()) % 1000)
    rate = float(torch.rand(1, generator=g)) * 5 + 0.1
    noise = torch.rand(len(RATIOS), generator=g)[RATIOS.index(ratio)]
    return rate * (1 - ratio) ** 2 + 0.01 * float(noise)


def _injected_table(seed: int):
    """:func:`measure` with :func:`_kl` in place of the measurement, the options' true ranks and costs."""
    def table(ctx, plans, params, clamp):
        out = {}
        for plan in plans:
            options = []
            for ratio in RATIOS:
                for m in plan.matrices:
                    rows, cols = m.shape
                    m.rank = clamp(math.floor(ratio * rows * cols / (rows + cols)), m, params)
                options.append(Option(ratio, tuple(m.rank for m in plan.matrices), plan.split_cost(),
                                      _kl(seed, plan.name, ratio)))
            out[plan.name] = options
        return out
    return table


@pytest.mark.parametrize(("seed", "target"), [(0, 0.8), (1, 0.6), (2, 0.45)])
def test_the_allocation_has_the_least_kl_sum_of_any_as_cheap(monkeypatch, seed: int, target: float) -> None:
    """Everett's theorem for the Lagrangian allocation, checked by enumeration on an injected
    table (one block's four layers, dense or one of 9 shares each: 10⁴ allocations): no allocation
    that holds at most the weights the chosen one holds has a smaller sum of KLs, and the chosen
    one fits ``target_params``."""
    monkeypatch.setattr(sensitivity_module, "measure", _injected_table(seed))
    report = rmtp.prune(_tiny_vit(depth=1), "svd-mp", calibration=_loader(), target_params=target,
                        allocation="sensitivity", min_dim=16)
    rows = _rows(report)
    options = {}  # per layer: (KL, weights held, kept rank), dense first; a fused qkv as three blocks
    for name, row in rows.items():
        rows_, cols = row.shape_before
        blocks = 3 if name.endswith("qkv") else 1
        height = rows_ // blocks
        options[name] = [(0.0, rows_ * cols, None)]
        for ratio in RATIOS:
            rank = max(1, math.floor(ratio * height * cols / (height + cols)))
            options[name].append((_kl(seed, name, ratio), blocks * rank * (height + cols), blocks * rank))
    chosen = [options[name][0] if row.detail["mode"] == "dense"
              else next(o for o in options[name][1:] if o[2] == row.kept_rank) for name, row in rows.items()]
    chosen_kl, chosen_cost = sum(o[0] for o in chosen), sum(o[1] for o in chosen)
    budget = target * sum(o[0][1] for o in options.values())
    assert chosen_cost <= budget
    # and it spends the budget: at most one layer's switch short of it (not every layer at its cheapest)
    assert chosen_cost > budget - max(o[0][1] - o[1][1] for o in options.values())
    best = min(sum(o[0] for o in combo) for combo in itertools.product(*options.values())
               if sum(o[1] for o in combo) <= chosen_cost)
    assert chosen_kl <= best + 1e-12, (chosen_kl, best)


def test_the_measurement_restores_every_weight_and_keeps_the_params_budget(monkeypatch) -> None:
    """After the measurement (before any layer is split) the model is the dense model bit for bit,
    also when scoring fails part-way; the result holds at most target_params of the weights."""
    model = _tiny_vit()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    measure = sensitivity_module.measure
    after_measuring = []

    def checked(ctx, plans, params, clamp):
        table = measure(ctx, plans, params, clamp)
        after_measuring.append(all(torch.equal(v, dense[k]) for k, v in ctx.model.state_dict().items()))
        return table

    monkeypatch.setattr(sensitivity_module, "measure", checked)
    report = rmtp.prune(model, "svd-mp", calibration=_loader(), target_params=0.6, allocation="sensitivity",
                        min_dim=16, sensitivity_images=32)
    assert after_measuring == [True]
    selected = [row for row in report.rows if not row.skipped]
    weights_before = sum(row.shape_before[0] * row.shape_before[1] for row in selected)
    weights_after = sum(p.numel() for row in selected
                        for name, p in model.get_submodule(row.layer).named_parameters() if not name.endswith("bias"))
    assert weights_after <= 0.6 * weights_before
    assert all(isinstance(row.detail.get("KL alone"), float) for row in selected if row.detail["mode"] == "split")

    # scoring that fails part-way (the third pass) leaves the weight it had written restored
    failing = _tiny_vit()
    dense = {k: v.clone() for k, v in failing.state_dict().items()}
    score = sensitivity_module.DenseReference.score
    calls = []

    def flaky(self, model):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("scoring failed")
        return score(self, model)

    monkeypatch.setattr(sensitivity_module, "measure", measure)
    monkeypatch.setattr(sensitivity_module.DenseReference, "score", flaky)
    with pytest.raises(RuntimeError, match="scoring failed"):
        rmtp.prune(failing, "svd-mp", calibration=_loader(), target_params=0.6, allocation="sensitivity", min_dim=16,
                   sensitivity_images=32)
    assert all(torch.equal(v, dense[k]) for k, v in failing.state_dict().items())


class _Damped(nn.Module):
    """A branch's output times 1e-3: what that branch computes hardly reaches the logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1e-3


def test_a_planted_insensitive_branch_is_cut_first(monkeypatch) -> None:
    """Block 0's MLP output damped 1000× (an inert branch) and the head sharpened 20× (peaked
    predictions, so a change shows in the KL): truncating block 0's fc1 or fc2 alone moves the
    predictions least of all layers at every share, and each keeps a smaller share than its twin
    in block 1."""
    model = _tiny_vit()
    model.blocks[0].ls2 = _Damped()
    with torch.no_grad():
        model.head.weight.mul_(20.0)
    tables = []
    measure = sensitivity_module.measure
    monkeypatch.setattr(sensitivity_module, "measure", lambda *args: tables.append(measure(*args)) or tables[-1])
    rows = _rows(rmtp.prune(model, "svd-mp", calibration=_loader(), target_params=0.8, allocation="sensitivity",
                            min_dim=16, sensitivity_images=32))
    table = tables[0]
    inert = ("blocks.0.mlp.fc1", "blocks.0.mlp.fc2")
    for ratio_index in range(len(RATIOS)):
        worst_inert = max(table[name][ratio_index].kl for name in inert)
        others = [options[ratio_index].kl for name, options in table.items() if name not in inert]
        assert worst_inert < min(others), (ratio_index, table)
    for name in ("mlp.fc1", "mlp.fc2"):  # each inert layer keeps less than its twin in block 1
        assert rows[f"blocks.0.{name}"].params_after < rows[f"blocks.1.{name}"].params_after, rows


def test_an_accuracy_budget_measures_once_per_step(monkeypatch) -> None:
    calls = []
    measure = sensitivity_module.measure

    def counted(*args, **kwargs):
        calls.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(sensitivity_module, "measure", counted)
    report = rmtp.prune(_tiny_vit(), "svd-mp", calibration=_loader(64), target_params=0.5, allocation="sensitivity",
                        min_dim=16, sensitivity_images=16, accuracy_budget={"max_drop": 0.3, "evaluations": 3})
    assert len(calls) == 1 and "budget" in report.agreement


class _Notes(rmtp.run.progress.Progress):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_a_budget_below_every_layers_smallest_share_is_applied_with_a_note(monkeypatch) -> None:
    monkeypatch.setattr(sensitivity_module, "measure", _injected_table(0))
    progress = _Notes()
    report = rmtp.prune(_tiny_vit(depth=1), "svd-mp", calibration=_loader(), target_params=0.05,
                        allocation="sensitivity", min_dim=16, progress=progress)
    assert all(row.detail["mode"] == "split" for row in report.rows)
    assert any("target_params 0.05 is below what allocation: sensitivity can reach" in n for n in progress.notes), \
        progress.notes
    quiet = _Notes()
    rmtp.prune(_tiny_vit(depth=1), "svd-mp", calibration=_loader(), target_params=0.6, allocation="sensitivity",
               min_dim=16, progress=quiet)
    assert quiet.notes == []


def test_sensitivity_needs_target_params_and_data_and_whitening() -> None:
    with pytest.raises(ValueError, match="allocation: sensitivity shares target_params"):
        SvdMpParams(allocation="sensitivity")
    with pytest.raises(ValueError, match="drop only_if_faster"):
        SvdMpParams(allocation="sensitivity", target_params=0.5, only_if_faster=True)
    with pytest.raises(ValueError, match="drop whiten: false"):
        SvdMpParams(allocation="sensitivity", target_params=0.5, whiten=False)
    assert SvdMpPruner.calibration_use(SvdMpParams(allocation="sensitivity", target_params=0.5)) == "required"
    with pytest.raises(RmtpError, match="calibration"):
        rmtp.prune(_tiny_vit(), "svd-mp", target_params=0.5, allocation="sensitivity", min_dim=16)
