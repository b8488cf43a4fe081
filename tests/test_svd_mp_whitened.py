"""svd-mp with calibration data: whitened truncation against a brute-force optimum, the calibration
plumbing (API and recipe), the layer-by-layer fit, and the planted test behind the edge decision.

Tolerances: the whitened truncation is compared in float64 with the optimum computed independently
(the top-k left singular vectors of W·Xᵀ) at rel 1e-6, rank-deficient inputs included (no damping
is used, so none is tolerated). A low-rank module stores float32 factors: through one, rel 1e-5;
model-level checks (float32 activations) compare products of factors at rel 1e-4.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_VIT, tiny_recipe, write_recipe
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rmtp
from rmtp.errors import RmtpError
from rmtp.fidelity.layerwise import collect_input_stats, input_columns
from rmtp.run.pipeline import run_recipe
from rmtp.run.recipe import load_recipe
from rmtp.spectral.mp import fit_mp, weight_matrix
from rmtp_plugins.svd_mp import SvdMpParams, SvdMpPruner
from rmtp_plugins.svd_mp.lowrank import BlockLowRankLinear, LowRankLinear, factorize
from rmtp_plugins.svd_mp.whitening import input_root, output_error, weight_order_gram, whitened_svd

# ------------------------------------------------------------------------------ the math, brute force


def _optimum_error(weight: torch.Tensor, inputs: torch.Tensor, rank: int) -> float:
    """min over rank-k Ŵ of ‖(W − Ŵ)·Xᵀ‖_F, independently: Eckart–Young on the outputs W·Xᵀ, whose best
    rank-k approximation P_k·W·Xᵀ (P_k: top-k left singular vectors) is reachable as Ŵ = P_k·W."""
    outputs = weight @ inputs.T
    u = torch.linalg.svd(outputs, full_matrices=False)[0][:, :rank]
    return float(torch.linalg.norm(outputs - u @ (u.T @ outputs)))


def _whitened_product(weight: torch.Tensor, inputs: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = whitened_svd(weight, input_root(inputs.T @ inputs, inputs.shape[0]))
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _inputs(rows: int, cols: int, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    """Anisotropic, correlated inputs (rows × cols), of rank ``rank`` when given."""
    g = torch.Generator().manual_seed(seed)
    inner = rank or cols
    mixing = torch.randn(inner, cols, generator=g, dtype=torch.float64)
    scales = torch.logspace(-2, 1, inner, dtype=torch.float64)
    return (torch.randn(rows, inner, generator=g, dtype=torch.float64) * scales) @ mixing + 0.3


def _dead_inputs(rows: int = 6, cols: int = 40, live: int = 10) -> torch.Tensor:
    """Few rows; only ``live`` of ``cols`` inputs are ever non-zero (dead channels, padded columns)."""
    x = torch.zeros(rows, cols, dtype=torch.float64)
    x[:, 3:3 + live] = _inputs(rows, live, seed=2)
    return x


def test_the_input_root_leaves_inputs_that_are_always_zero_out_of_the_decomposition() -> None:
    x = _dead_inputs()
    root = input_root(x.T @ x, x.shape[0])
    assert root.shape == (40, 40)
    torch.testing.assert_close(root @ root.T, x.T @ x / x.shape[0], rtol=0, atol=1e-12)
    assert not root[:3].any() and not root[13:].any(), "a dead input has a zero row in S"


@pytest.mark.parametrize("failure", ["raises", "nan"])
def test_the_input_root_falls_back_to_the_svd_where_eigh_fails(failure: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """LAPACK's ``eigh`` failed to converge (or returned NaN) on a ResNet's last 3×3 convs calibrated on
    a few images; the SVD of the same symmetric positive semi-definite matrix gives its eigenpairs."""
    def failing_eigh(matrix: torch.Tensor):
        if failure == "raises":
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return torch.full(matrix.shape[:1], float("nan"), dtype=matrix.dtype), torch.zeros_like(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    x = _dead_inputs()
    root = input_root(x.T @ x, x.shape[0])
    torch.testing.assert_close(root @ root.T, x.T @ x / x.shape[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("m", "n", "k", "rows", "data_rank"), [
    (20, 30, 5, 200, None),    # full-rank inputs
    (30, 20, 8, 200, None),    # more outputs than inputs
    (20, 30, 5, 200, 12),      # rank-deficient inputs (correlated features): C singular
    (16, 40, 6, 25, None),     # fewer calibration rows than inputs: C singular
    (16, 40, 30, 25, None),    # k above the data's rank: the error is zero
])
def test_whitened_truncation_is_the_output_error_optimum(m: int, n: int, k: int, rows: int,
                                                         data_rank: int | None) -> None:
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = _inputs(rows, n, data_rank)
    approx = _whitened_product(weight, x, k)
    error = float(torch.linalg.norm((weight - approx) @ x.T))
    best = _optimum_error(weight, x, k)
    scale = float(torch.linalg.norm(weight @ x.T))
    assert abs(error - best) <= 1e-6 * max(best, 1e-9 * scale)
    assert torch.linalg.matrix_rank(approx) <= k
    plain = torch.linalg.svd(weight, full_matrices=False)
    plain_error = float(torch.linalg.norm((weight - (plain[0][:, :k] * plain[1][:k]) @ plain[2][:k]) @ x.T))
    if best > 1e-9 * scale:
        assert plain_error > best * 1.01  # the test tells whitening from a plain truncation


def test_singular_values_are_the_output_energy_and_error_is_the_tail() -> None:
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(12, 24, generator=g, dtype=torch.float64)
    x = _inputs(300, 24)
    u, s, vh = whitened_svd(weight, input_root(x.T @ x, x.shape[0]))
    mean_output_energy = float((weight @ x.T).pow(2).sum()) / x.shape[0]
    assert float(s.pow(2).sum()) == pytest.approx(mean_output_energy, rel=1e-9)
    approx = (u[:, :4] * s[:4]) @ vh[:4]
    relative = float(torch.linalg.norm((weight - approx) @ x.T) / torch.linalg.norm(weight @ x.T))
    assert output_error(s, 4) == pytest.approx(relative, rel=1e-9)


def test_factors_match_svd_llm_cholesky_formula() -> None:
    """With a full-rank C, A = Σ_k^{-1/2}·U_kᵀ·W is SVD-LLM's Σ_k^{1/2}·V_kᵀ·L⁻¹ (L = chol(C))."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(18, 26, generator=g, dtype=torch.float64)
    x = _inputs(400, 26)
    c = x.T @ x / x.shape[0]
    chol = torch.linalg.cholesky(c)
    u_ref, s_ref, vh_ref = torch.linalg.svd(weight @ chol, full_matrices=False)
    first_ref = s_ref[:7].sqrt()[:, None] * vh_ref[:7] @ torch.linalg.inv(chol)
    u, s, vh = whitened_svd(weight, input_root(x.T @ x, x.shape[0]))
    torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-12)
    signs = torch.sign((u[:, :7] * u_ref[:, :7]).sum(0))  # singular vectors are defined up to sign
    torch.testing.assert_close(s[:7].sqrt()[:, None] * vh[:7] * signs[:, None], first_ref, rtol=1e-7, atol=1e-9)


def test_second_factor_refit_is_a_no_op_and_whitening_on_the_new_inputs_beats_it() -> None:
    """SVD-LLM's update refits B = argmin ‖W·Xᵀ − B·A·Xᵀ‖ = W·C·Aᵀ·(A·C·Aᵀ)⁻¹. On the inputs
    the factors were whitened with it returns B unchanged; on other inputs (the compressed model's) it
    helps, but whitening on those inputs directly, as the layer-by-layer fit does, is better still."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(24, 32, generator=g, dtype=torch.float64)
    x, shifted = _inputs(500, 32, seed=5), _inputs(500, 32, seed=6)
    k = 8

    def factors(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, vh = whitened_svd(weight, input_root(data.T @ data, data.shape[0]))
        return u[:, :k] * s[:k].sqrt(), s[:k].sqrt()[:, None] * vh[:k]

    def refit(first: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        c = data.T @ data
        return weight @ c @ first.T @ torch.linalg.inv(first @ c @ first.T)

    def error(second: torch.Tensor, first: torch.Tensor, data: torch.Tensor) -> float:
        return float(torch.linalg.norm((weight - second @ first) @ data.T))

    second, first = factors(x)
    torch.testing.assert_close(refit(first, x), second, rtol=1e-8, atol=1e-10)
    updated = refit(first, shifted)
    direct = error(*factors(shifted), shifted)
    assert direct <= error(updated, first, shifted) <= error(second, first, shifted)
    assert direct < 0.99 * error(updated, first, shifted)


def test_conv_gram_in_weight_order() -> None:
    """A conv's im2col Gram (GEMM order, channel fastest) reordered to weight_matrix's columns: then
    W·G·Wᵀ is the conv's output Gram, which only the right permutation gives."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), bias=False).double()
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    columns = input_columns(conv, x)
    gram = weight_order_gram(conv, columns.T @ columns)
    w = weight_matrix(conv.weight.detach())
    out = conv(x).permute(1, 0, 2, 3).reshape(5, -1)
    torch.testing.assert_close(w @ gram @ w.T, out @ out.T, rtol=1e-10, atol=1e-10)


def test_whitened_factors_in_a_low_rank_conv_give_the_optimum() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.1, 0.5]).view(1, 4, 1, 1).double()
    columns = input_columns(conv, x)
    root = input_root(weight_order_gram(conv, columns.T @ columns), columns.shape[0])
    w = weight_matrix(conv.weight.detach())
    low = factorize(conv, *whitened_svd(w, root), rank=3).double()  # the module's factors are float32
    with torch.no_grad():
        error = float(torch.linalg.norm(low(x) - conv(x)))
        reference = conv(x)
    outputs = (reference - conv.bias.detach().view(1, -1, 1, 1)).permute(1, 0, 2, 3).reshape(6, -1)
    u = torch.linalg.svd(outputs, full_matrices=False)[0][:, :3]
    assert error == pytest.approx(float(torch.linalg.norm(outputs - u @ (u.T @ outputs))), rel=1e-5)


# ------------------------------------------------------------------------------ the edge decision


def test_planted_rank_is_recovered_by_the_edge_on_w_not_on_the_whitened_matrix() -> None:
    """W = rank-r signal + i.i.d. noise, inputs with a strongly anisotropic covariance. The MP edge
    on W finds r; on W·S (equivalently the output covariance W·C·Wᵀ, same spectrum squared) the
    noise is no longer i.i.d. (G·S has the input covariance in its columns) and the edge counts
    the noise in high-variance input directions as signal: why svd-mp keeps the edge on W."""
    g = torch.Generator().manual_seed(7)
    m, n, r, sigma = 120, 240, 4, 0.02
    threshold = sigma * (m * n) ** 0.25
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    weight = (u * (3.0 * threshold)) @ v.T + sigma * torch.randn(m, n, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    x = (torch.randn(4000, n, generator=g, dtype=torch.float64) * torch.logspace(-1.5, 1.5, n).double()) @ basis.T
    isotropic = torch.randn(4000, n, generator=g, dtype=torch.float64)

    def edge_on_ws(data: torch.Tensor) -> int:
        return fit_mp(whitened_svd(weight, input_root(data.T @ data, data.shape[0]))[1], (m, n),
                      tw_confidence=0.999).rank

    assert fit_mp(torch.linalg.svdvals(weight), (m, n), tw_confidence=0.999).rank == r
    assert edge_on_ws(isotropic) == r  # whitening by C ∝ I is a scale: the same spectrum shape
    assert abs(edge_on_ws(x) - r) >= 2 * r  # measured: 50-51 of 4 (seeds 0-4)
    outputs = weight @ x.T  # the output covariance's spectrum, as M × samples
    assert abs(fit_mp(torch.linalg.svdvals(outputs), (m, x.shape[0]), tw_confidence=0.999).rank - r) >= 2 * r


# ------------------------------------------------------------------------------ the pruner and its plumbing


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT).eval()


def _loader(count: int = 48, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 1, 16, 16, generator=g)
    return DataLoader(TensorDataset(images, torch.zeros(count, dtype=torch.long)), batch_size=16)


def _effective(module: nn.Module) -> torch.Tensor:
    """A split layer's effective matrix (second·first, per block for a fused qkv)."""
    first = module.first.weight.detach().double()
    if isinstance(module, BlockLowRankLinear):
        parts = first.split(module.ranks)
        return torch.cat([s.weight.detach().double() @ p for s, p in zip(module.seconds, parts)])
    return module.second.weight.detach().double() @ first


def _check_optimal(model: nn.Module, dense: nn.Module, stats_model: nn.Module, report, loader) -> int:
    """Every split layer of ``model`` holds, per block, the whitened optimum U_k·U_kᵀ·W of the dense
    weight on the inputs that layer gets in ``stats_model``; returns how many layers were checked."""
    splits = [row for row in report.rows if row.detail.get("mode") == "split"]
    watched = {row.layer: stats_model.get_submodule(row.layer) for row in splits}
    watched = {name: getattr(m, "first", m) for name, m in watched.items()}
    stats = collect_input_stats(stats_model, watched, loader, torch.device("cpu"), squares=False, gram=True)
    for row in splits:
        module = model.get_submodule(row.layer)
        weight = dense.get_submodule(row.layer).weight.detach().double()
        root = input_root(stats[row.layer].gram, stats[row.layer].count)
        ranks = module.ranks if isinstance(module, BlockLowRankLinear) else [module.rank]
        blocks = weight.split(weight.shape[0] // len(ranks))
        expected = torch.cat([_projected(b, root, k) for b, k in zip(blocks, ranks)])
        torch.testing.assert_close(_effective(module), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    return len(splits)


def _projected(weight: torch.Tensor, root: torch.Tensor, rank: int) -> torch.Tensor:
    u = torch.linalg.svd(weight @ root, full_matrices=False)[0][:, :rank]
    return u @ (u.T @ weight)


@pytest.mark.parametrize("sequential", [True, False])
def test_prune_writes_the_whitened_optimum_on_the_inputs_each_layer_gets(sequential: bool) -> None:
    """Layer by layer, each split layer is the optimum on its inputs in the *pruned* model (a layer's
    inputs depend only on the layers before it, so the final model shows what it was fitted on);
    in one pass, on its inputs in the dense model. Each is checked against the other's inputs too."""
    model, loader = _tiny_vit(), _loader()
    dense = copy.deepcopy(model)
    report = rmtp.prune(model, "svd-mp", calibration=loader, target_params=0.5, allocation="uniform", min_dim=16,
                        sequential=sequential)
    assert all("whitened" in row.note for row in report.rows if row.skipped is None)
    fitted_on, other = (model, dense) if sequential else (dense, model)
    assert _check_optimal(model, dense, fitted_on, report, loader) >= 8
    with pytest.raises(AssertionError):
        _check_optimal(model, dense, other, report, loader)


def test_without_data_or_with_whiten_false_svd_mp_is_unchanged() -> None:
    loader = _loader()
    plain, off, on = _tiny_vit(), _tiny_vit(), _tiny_vit()
    rmtp.prune(plain, "svd-mp", min_dim=16, margin=0.5)
    report = rmtp.prune(off, "svd-mp", calibration=loader, whiten=False, min_dim=16, margin=0.5)
    rmtp.prune(on, "svd-mp", calibration=loader, min_dim=16, margin=0.5)
    assert all("whitened" not in row.note for row in report.rows)
    plain_state, off_state, on_state = plain.state_dict(), off.state_dict(), on.state_dict()
    assert plain_state.keys() == off_state.keys() == on_state.keys()
    assert all(torch.equal(plain_state[k], off_state[k]) for k in plain_state)
    assert not all(torch.equal(plain_state[k], on_state[k]) for k in plain_state)


def test_whitened_prune_is_deterministic_and_its_ranks_are_the_edge_on_w() -> None:
    loader = _loader()
    first, second, raw = _tiny_vit(), _tiny_vit(), _tiny_vit()
    a = rmtp.prune(first, "svd-mp", calibration=loader, min_dim=16, margin=0.5)
    b = rmtp.prune(second, "svd-mp", calibration=loader, min_dim=16, margin=0.5)
    c = rmtp.prune(raw, "svd-mp", min_dim=16, margin=0.5)
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    assert [r.detail.get("rank") for r in a.rows] == [r.detail.get("rank") for r in b.rows]
    assert [r.detail.get("rank") for r in a.rows] == [r.detail.get("rank") for r in c.rows]
    assert any("output error" in r.detail for r in a.rows)


def test_uniform_allocation_keeps_the_share_of_each_matrix() -> None:
    model = _tiny_vit()
    report = rmtp.prune(model, "svd-mp", target_params=0.6, allocation="uniform", min_dim=16)
    fc1 = next(r for r in report.rows if r.layer.endswith("mlp.fc1"))
    qkv = next(r for r in report.rows if r.layer.endswith("attn.qkv"))
    assert fc1.kept_rank == int(0.6 * 128 * 32 / 160)
    assert qkv.kept_rank == 3 * int(0.6 * 32 * 32 / 64)
    with pytest.raises(ValueError, match="allocation: uniform"):
        SvdMpParams(allocation="uniform")


def test_calibration_use_follows_whiten() -> None:
    assert SvdMpPruner.calibration_use(SvdMpParams()) == "optional"
    assert SvdMpPruner.calibration_use(SvdMpParams(whiten=True)) == "required"
    assert SvdMpPruner.calibration_use(SvdMpParams(whiten=False)) == "unused"
    with pytest.raises(RmtpError, match=r"^svd-mp needs calibration data"):
        rmtp.prune(_tiny_vit(), "svd-mp", whiten=True, min_dim=16)


def test_recipe_step_whitens_only_when_asked(tmp_path: Path) -> None:
    recipe = tiny_recipe([
        {"prune": "svd-mp", "layers": {"include": ["blocks.0.*"]}, "params": {"min_dim": 16, "target_params": 0.5}},
        {"prune": "svd-mp", "layers": {"include": ["blocks.1.*"]},
         "params": {"min_dim": 16, "target_params": 0.5, "whiten": True, "sequential": True}},
    ])
    result = run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    plain, whitened = result.report.steps
    assert plain.rows and all("whitened" not in row.note for row in plain.rows)
    assert whitened.rows and all(row.note.endswith("whitened, layer by layer") for row in whitened.rows)
    assert isinstance(result.model.blocks[1].mlp.fc1, LowRankLinear)


def test_with_data_a_layer_whose_split_does_not_pay_is_kept_not_truncated() -> None:
    """Rank 28 of a 32×32 block does not pay (break-even 16): on raw weights svd-mp writes the
    rank-k reconstruction back (the seeds' denoising), with data it keeps the layer as it was."""
    loader = _loader()
    raw, whitened, dense = _tiny_vit(), _tiny_vit(), _tiny_vit()
    settings = dict(min_dim=16, margin=0.01, max_rank_fraction=0.875, layers=["blocks.0.attn.proj"])
    (raw_row,) = rmtp.prune(raw, "svd-mp", **settings).rows
    (row,) = rmtp.prune(whitened, "svd-mp", calibration=loader, **settings).rows
    assert raw_row.note.startswith("dense, rank-k reconstruction")
    assert row.note.startswith("dense, unchanged (split would not pay)")
    weight = dense.blocks[0].attn.proj.weight
    assert not torch.equal(raw.blocks[0].attn.proj.weight, weight)
    assert torch.equal(whitened.blocks[0].attn.proj.weight, weight)
