"""SparseGPT as an n:m score: the column sweep against brute-force least squares on small random
problems (float64), the exact N:M pattern, determinism, dead inputs, Conv2d layout, and the pruner
end to end on a tiny ViT and ResNet (layer by layer, weights updated, zeros kept through
fine-tuning). The sequential driver itself is tested in ``tests/test_layerwise.py``.

Tolerances, and why:

* Exactness (1e-6 relative, float64, no damping): when the mask prunes only inside the first
  column block and every later column is free, OBS's correction of the later columns is the
  least-squares optimum of those columns given the first block's result. Rounding in the
  Cholesky factors of a well-conditioned 16×16 Hessian stays far below 1e-6.
* With damping, the same correction is the optimum of the damped quadratic (a ridge problem),
  solved in closed form: 1e-8 relative.
* The blocked Cholesky sweep equals an explicit-inverse OBS written the slow way (mask exactly,
  weights to 1e-9), and ``least_squares_refit`` equals row-by-row lstsq (1e-6 relative).
* In general SparseGPT is greedy (a column is fixed once visited, so it cannot compensate for
  groups pruned after it): its error must lie between the least-squares refit of its own mask (the
  lower bound, by definition) and 4× that refit (observed 1.5–3.1× on these problems: checked
  against an explicit-inverse OBS, the gap is the method's, not the code's), and at most 1/1.5 of
  the error of Wanda's mask with no update (observed 1.8–11× lower). A sweep that corrected the
  wrong columns, or in the wrong layout, does worse than Wanda.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import TINY_VIT
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rmtp
from rmtp.contract.pruner import PruneContext
from rmtp.errors import RmtpError
from rmtp.fidelity.layerwise import LayerInputs, compress_sequentially, input_columns
from rmtp.gemm import from_gemm, gemm_view
from rmtp.run.layer_filter import select_layers
from rmtp.training.pieces import zero_masks
from rmtp_plugins.nm import NmParams, NmPruner, check_nm
from rmtp_plugins.nm.masks import nm_mask, scores_for
from rmtp_plugins.nm.permute import PermutedInput
from rmtp_plugins.nm.sparsegpt import least_squares_refit, output_error, sparsegpt

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------- small problems


def _problem(rows: int, k: int, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, X): a random weight (rows × K) and inputs (samples × K) shaped like real activations:
    a per-feature mean (LayerNorm outputs have one) plus correlated noise whose spectrum decays
    tenfold. With white inputs OBS's correction vanishes and every method looks alike."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(0, -1, k, dtype=torch.float64)
    mean = torch.randn(k, generator=g, dtype=torch.float64)
    x = (torch.randn(samples, k, generator=g, dtype=torch.float64) * spectrum) @ basis.T + mean
    w = torch.randn(rows, k, generator=g, dtype=torch.float64)
    return w, x


def _error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """‖(W − Ŵ)Xᵀ‖²_F, straight from the data."""
    return float((x @ (w - pruned).T).pow(2).sum())


def _least_squares_refit(w: torch.Tensor, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The best weights for a fixed mask, row by row: min over ŵ_S of ‖X_S ŵ_S − X w‖."""
    out = torch.zeros_like(w)
    for o in range(w.shape[0]):
        kept = keep[o].nonzero().flatten()
        solution = torch.linalg.lstsq(x[:, kept], (x @ w[o])[:, None]).solution
        out[o, kept] = solution.flatten()
    return out


def _run(w: torch.Tensor, x: torch.Tensor, n: int, m: int, **kwargs) -> torch.Tensor:
    return sparsegpt(w, x.T @ x, x.shape[0], n, m, **kwargs).matrix


def _explicit_obs(w: torch.Tensor, x: torch.Tensor, n: int, m: int, percdamp: float) -> torch.Tensor:
    """SparseGPT written the slow, obvious way: per row, the inverse Hessian of the still-free
    columns kept explicitly (downdated as each column is fixed), the group's mask chosen on
    w²/[(H_{j:,j:})⁻¹]_00 (the squared diagonal of the upper Cholesky factor of H⁻¹), the OBS
    correction Δ = −w_j/[H_F⁻¹]_jj · H_F⁻¹[:, j] applied at once: no blocks, no Cholesky factor."""
    k = w.shape[1]
    h = 2 * x.T @ x / x.shape[0]
    h = h + percdamp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype)
    saliency_scale = torch.stack([torch.linalg.inv(h[i:, i:])[0, 0] for i in range(k)])
    out = w.clone()
    for row in out:
        inverse = torch.linalg.inv(h)
        for j in range(k):
            if j % m == 0:
                keep = nm_mask((row[j:j + m] ** 2 / saliency_scale[j:j + m])[None], n, m)[0]
            if not keep[j % m]:
                row[j:] -= row[j] / inverse[j, j] * inverse[j:, j]  # fixed columns: ~0 there, kept exact
                row[j] = 0.0
            inverse = inverse - torch.outer(inverse[:, j], inverse[j]) / inverse[j, j]
    return out


@pytest.mark.parametrize("n,m,blocksize", [(2, 4, 8), (2, 4, 128), (1, 4, 4), (3, 8, 8)])
def test_the_sweep_equals_an_explicit_inverse_obs(n: int, m: int, blocksize: int) -> None:
    """Blocks, lazy updates and the Cholesky factor change the arithmetic, not the result: mask
    and weights equal the explicit-inverse OBS (1e-9, float64)."""
    w, x = _problem(rows=5, k=16, samples=48, seed=6)
    ours = sparsegpt(w, x.T @ x, 48, n, m, blocksize=blocksize, percdamp=0.01).matrix
    expected = _explicit_obs(w, x, n, m, percdamp=0.01)
    assert torch.equal(ours != 0, expected != 0)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("blocksize", [4, 8, 128])
def test_free_columns_after_the_first_block_get_the_least_squares_optimum(blocksize: int) -> None:
    """Prune inside columns 0..3 only (a given mask), keep every later column: the later columns
    must equal the least-squares optimum given the first four as SparseGPT left them — through
    the lazy cross-block update too (blocksize 4 and 8: later columns in later blocks)."""
    w, x = _problem(rows=6, k=16, samples=64, seed=0)
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[:, :4] = torch.rand(6, 4, generator=torch.Generator().manual_seed(1)) > 0.5
    out = sparsegpt(w, x.T @ x, 64, 2, 4, blocksize=blocksize, percdamp=0.0, keep=keep).matrix
    assert torch.all(out[~keep] == 0)
    target = x @ w.T - x[:, :4] @ out[:, :4].T  # what the free columns must reproduce
    best = torch.linalg.lstsq(x[:, 4:], target).solution.T
    assert torch.linalg.norm(out[:, 4:] - best) <= 1e-6 * torch.linalg.norm(best)


def test_damping_gives_the_optimum_of_the_damped_quadratic() -> None:
    """With percdamp > 0 the correction after pruning column 0 minimises Δ H_d Δᵀ, H_d = 2XᵀX/t +
    λI, λ = percdamp·mean(diag 2XᵀX/t): Ŵ_F = W_F + H_FF⁻¹ H_F0 w_0 (closed form)."""
    w, x = _problem(rows=5, k=8, samples=12, seed=3)  # fewer samples than 2·K: damping matters
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[:, 0] = False
    out = sparsegpt(w, x.T @ x, 12, 2, 4, percdamp=0.1, keep=keep).matrix
    h = 2 * x.T @ x / 12
    h = h + 0.1 * torch.diagonal(h).mean() * torch.eye(8, dtype=torch.float64)
    expected = w[:, 1:] + (torch.linalg.solve(h[1:, 1:], h[1:, :1]) @ w[:, :1].T).T
    torch.testing.assert_close(out[:, 1:], expected, rtol=1e-8, atol=1e-10)
    assert torch.all(out[:, 0] == 0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_error_lies_between_its_own_refit_and_wanda(seed: int, n: int, m: int) -> None:
    w, x = _problem(rows=8, k=32, samples=96, seed=seed)
    out = _run(w, x, n, m, blocksize=8)
    keep = out != 0
    ours = _error(w, out, x)
    refit = _error(w, _least_squares_refit(w, keep, x), x)
    wanda = _error(w, w * nm_mask(scores_for(w, x.pow(2).sum(0)), n, m), x)
    assert refit <= ours * (1 + 1e-9)
    assert ours <= 4.0 * refit, (ours, refit)
    assert ours <= wanda / 1.5, (ours, wanda)
    assert output_error(w, out, x.T @ x) == pytest.approx(ours / float((x @ w.T).pow(2).sum()), rel=1e-9)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8), (6, 12)])
def test_the_pattern_is_exactly_n_of_m_and_the_kept_weights_change(n: int, m: int) -> None:
    w, x = _problem(rows=10, k=48, samples=80, seed=1)
    result = sparsegpt(w, x.T @ x, 80, n, m, blocksize=16)
    check = check_nm(result.matrix, n, m)
    assert check.ok and check.nonzeros == n * check.groups  # every group keeps exactly n
    assert torch.equal(result.keep, result.matrix != 0)
    kept = result.keep
    assert not torch.allclose(result.matrix[kept], w[kept])  # the OBS update moved the kept weights


@pytest.mark.parametrize("max_elements", [1 << 25, 1000])  # one batch of rows; several
def test_the_refit_is_the_least_squares_optimum_of_the_mask(max_elements: int) -> None:
    """least_squares_refit equals the row-by-row lstsq refit (1e-6 relative, no damping), keeps the
    mask, and never does worse than the sweep it refits."""
    w, x = _problem(rows=8, k=32, samples=96, seed=5)
    result = sparsegpt(w, x.T @ x, 96, 2, 4, blocksize=8)
    refit = least_squares_refit(w, result.keep, x.T @ x, 96, percdamp=0.0, max_elements=max_elements)
    best = _least_squares_refit(w, result.keep, x)
    assert torch.linalg.norm(refit - best) <= 1e-6 * torch.linalg.norm(best)
    assert torch.all(refit[~result.keep] == 0) and check_nm(refit, 2, 4).ok
    assert _error(w, refit, x) < _error(w, result.matrix, x)


def test_the_result_is_deterministic() -> None:
    w, x = _problem(rows=12, k=64, samples=100, seed=2)
    first = _run(w, x, 2, 4)
    again = _run(w.clone(), x.clone(), 2, 4)
    assert torch.equal(first, again)


def test_dead_inputs_are_zeroed_and_need_no_damping() -> None:
    """An input that is zero on every row: its weights go to zero (they never mattered), H stays
    invertible without damping (its diagonal is set to 1), nothing is NaN, and the error equals
    the same problem without that column."""
    w, x = _problem(rows=6, k=16, samples=64, seed=4)
    x[:, 5] = 0.0
    out = _run(w, x, 2, 4, percdamp=0.0)
    assert torch.isfinite(out).all() and torch.all(out[:, 5] == 0)
    assert check_nm(out, 2, 4).ok
    assert _error(w, out, x) <= _error(w, w * nm_mask(scores_for(w, x.pow(2).sum(0)), 2, 4), x)


def test_an_indefinite_hessian_is_a_user_error() -> None:
    gram = -torch.eye(4, dtype=torch.float64)  # no real Gram matrix looks like this; damping cannot save it
    with pytest.raises(RmtpError, match="percdamp"):
        sparsegpt(torch.ones(2, 4, dtype=torch.float64), gram, 3, 2, 4, percdamp=0.01)


def test_a_conv_is_pruned_in_the_gemm_layout_its_inputs_are_collected_in() -> None:
    """SparseGPT on a Conv2d through compress_sequentially: valid N:M on the conv's GEMM groups,
    and the conv's real output error (run on the data) is what the Gram predicts and below
    Wanda's. A mismatch between the im2col column order and the weight layout fails both."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, kernel_size=3, padding=1, bias=False).double()
    dense = copy.deepcopy(conv)
    images = [(torch.randn(4, 8, 6, 6, dtype=torch.float64).cumsum(1), None) for _ in range(2)]  # correlated channels
    model = nn.Sequential(conv)
    seen: dict[str, LayerInputs] = {}

    def compress(name: str, module: nn.Module, inputs: LayerInputs) -> None:
        seen[name] = inputs
        matrix = gemm_view(module.weight)
        pruned = sparsegpt(matrix, inputs.gram, inputs.count, 2, 4).matrix
        module.weight.copy_(from_gemm(pruned, tuple(module.weight.shape)))

    compress_sequentially(model, ["0"], images, CPU, compress=compress)
    assert check_nm(conv.weight, 2, 4).ok
    x = torch.cat([batch for batch, _ in images])
    with torch.no_grad():
        ours = float((conv(x) - dense(x)).pow(2).sum())
        cols = input_columns(dense, x)
        matrix = gemm_view(dense.weight)
        wanda = matrix * nm_mask(scores_for(matrix, cols.pow(2).sum(0)), 2, 4)
        wanda_error = float((cols @ (matrix - wanda).T).pow(2).sum())
        total = float(dense(x).pow(2).sum())
    assert ours / total == pytest.approx(output_error(matrix, gemm_view(conv.weight), seen["0"].gram), rel=1e-9)
    assert ours < wanda_error


# ---------------------------------------------------------------------------------- the pruner


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **{**TINY_VIT, "embed_dim": 48, "num_heads": 2}).eval()


def _loader(count: int = 24) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(count, 1, 16, 16, generator=g)
    return DataLoader(TensorDataset(x, torch.zeros(count, dtype=torch.long)), batch_size=8)


def _prune(model: nn.Module, **params) -> list:
    arch = rmtp.get_plugins().architecture("vit")
    ctx = PruneContext(model=model, arch=arch, layers=select_layers(arch.prunable_layers(model), None), device=CPU,
                       seed=0, calibration=_loader())
    return NmPruner().prune(ctx, NmParams(budget="uniform", only_if_faster=False, **params)).rows


def _output_error(model: nn.Module, dense: nn.Module) -> float:
    x = torch.cat([batch for batch, _ in _loader()])
    with torch.no_grad():
        return float((model(x) - dense(x)).pow(2).mean())


def test_the_pruner_updates_weights_keeps_the_pattern_and_beats_wanda() -> None:
    dense = _vit()
    model, wanda = copy.deepcopy(dense), copy.deepcopy(dense)
    rows = _prune(model, score="sparsegpt")
    _prune(wanda, score="wanda")
    pruned = [r for r in rows if r.skipped is None]
    assert pruned and all(r.detail["sparsegpt"].endswith("err") for r in pruned)
    moved = 0
    for row in pruned:
        weight = model.get_submodule(row.layer).weight
        check = check_nm(weight, 2, 4)
        assert check.ok and check.nonzeros == 2 * check.groups, row.layer
        original = dense.get_submodule(row.layer).weight
        moved += int(not torch.equal(weight[weight != 0], original[weight != 0]))
    assert moved == len(pruned)  # every layer's kept weights were corrected, not just masked
    assert _output_error(model, dense) < _output_error(wanda, dense)
    refitted = copy.deepcopy(dense)
    refit_rows = _prune(refitted, score="sparsegpt", refit=True)
    assert all(", refit " in r.detail["sparsegpt"] for r in refit_rows if r.skipped is None)
    first = pruned[0].layer  # same inputs in both runs, so the same mask: only its kept weights moved
    assert torch.equal(refitted.get_submodule(first).weight != 0, model.get_submodule(first).weight != 0)
    assert _output_error(refitted, dense) < _output_error(model, dense)


def test_permutation_and_mp_budgets_compose_with_sparsegpt() -> None:
    """Permuted layers are fitted on their permuted inputs (inside PermutedInput too), and MP
    budgets choose patterns per layer; the dense function of a permuted model is unchanged, so
    the only error left is the pruning's, which must stay below Wanda's under the same settings."""
    dense = _vit()
    settings = {"budget": "mp", "target_macs": 0.7, "permute": True, "only_if_faster": False}
    model, wanda = copy.deepcopy(dense), copy.deepcopy(dense)
    arch = rmtp.get_plugins().architecture("vit")
    layers = select_layers(arch.prunable_layers(model), None)
    rows = {}
    for target, score in ((model, "sparsegpt"), (wanda, "wanda")):
        ctx = PruneContext(model=target, arch=arch, layers=layers, device=CPU, seed=0, calibration=_loader())
        rows[score] = NmPruner().prune(ctx, NmParams(score=score, **settings)).rows
    patterns = [r.detail.get("pattern") for r in rows["sparsegpt"]]
    assert "2:4" in patterns and "dense" in patterns
    assert patterns == [r.detail.get("pattern") for r in rows["wanda"]]  # the budget ranks as Wanda
    assert any(isinstance(m, PermutedInput) for m in model.modules())
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and bool((module.weight == 0).any()):
            assert check_nm(module.weight, 2, 4).ok, name
    assert _output_error(model, dense) < _output_error(wanda, dense)


def test_the_pruner_prunes_a_resnet_conv_by_conv() -> None:
    """Conv2d layers through the pruner (GEMM layout, written back in the conv's own shape, BatchNorm
    after them): every pruned conv is exact 2:4 and the network's outputs are closer to dense than
    with Wanda's masks."""
    torch.manual_seed(0)
    dense = timm.create_model("resnet18", layers=(1, 1, 1, 1), channels=(16, 32, 32, 32), num_classes=10).eval()
    arch = rmtp.get_plugins().architecture("resnet")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 32, 32, generator=g)
    loader = DataLoader(TensorDataset(images, torch.zeros(16, dtype=torch.long)), batch_size=8)
    errors = {}
    for score in ("sparsegpt", "wanda"):
        model = copy.deepcopy(dense)
        ctx = PruneContext(model=model, arch=arch, layers=select_layers(arch.prunable_layers(model), None),
                           device=CPU, seed=0, calibration=loader)
        rows = NmPruner().prune(ctx, NmParams(score=score, budget="uniform", only_if_faster=False)).rows
        convs = [r.layer for r in rows if r.skipped is None]
        assert convs and all(isinstance(model.get_submodule(c), nn.Conv2d) for c in convs)
        assert all(check_nm(model.get_submodule(c).weight, 2, 4).ok for c in convs)
        with torch.no_grad():
            errors[score] = float((model(images) - dense(images)).pow(2).mean())
    assert errors["sparsegpt"] < errors["wanda"]


def test_zeros_stay_zero_through_the_fine_tune_masks() -> None:
    """Fine-tuning keeps the mask of every weight that is zero when it starts (zero_masks): after
    SparseGPT those are exactly the pruned weights, however the kept ones moved."""
    model = _vit()
    rows = _prune(model, score="sparsegpt")
    names = [r.layer for r in rows if r.skipped is None]
    for weight, mask in zero_masks(model, names):
        assert check_nm(weight * mask, 2, 4).ok and torch.equal(weight * mask, weight)
        assert int(mask.sum()) == weight.numel() // 2


def test_params_and_calibration_are_checked() -> None:
    with pytest.raises(ValidationError, match="restore"):
        NmParams(score="sparsegpt", restore=True)
    with pytest.raises(ValidationError, match="percdamp, refit: only used with score: sparsegpt"):
        NmParams(score="wanda", percdamp=0.1, refit=True)
    model = _vit()
    arch = rmtp.get_plugins().architecture("vit")
    ctx = PruneContext(model=model, arch=arch, layers=select_layers(arch.prunable_layers(model), None), device=CPU,
                       seed=0)
    with pytest.raises(RmtpError, match="sparsegpt needs calibration"):
        NmPruner().prune(ctx, NmParams(score="sparsegpt", budget="uniform", only_if_faster=False))
