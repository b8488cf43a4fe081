"""The solution path of ``spp``: split linearized Bregman iteration (split LBI) on the group gates,
the importance order it yields, and which groups a sparsity level removes. Pure tensor code: the
model only enters through the ``loss`` closure (``docs/spp.md`` has the derivation).

With the weights frozen, the gates γ (one per group, γ₀ = 1) are coupled to a sparse copy Γ
(Γ₀ = 0) through the augmented loss L̄(γ, Γ) = L(γ) + ‖γ − Γ‖² / (2ν), and iterated (Huang & Yao's
split LBI; Fu et al.'s DessiLBI, on gates as in Ding et al.'s SPP)::

    γ_{k+1} = γ_k − κ·α·(∇L(γ_k) + (γ_k − Γ_k)/ν)
    Z_{k+1} = Z_k + α·(γ_k − Γ_k)/ν
    Γ_{k+1} = κ·soft₊(Z_{k+1}, λ),     soft₊(z, λ) = max(z − λ, 0)

Γ starts all zero and groups join its support one by one: group j *enters* at the first step with
Γ_j ≠ 0. The coupling pulls every gate towards Γ (= 0 before entry); the task loss pushes back on
gates the loss needs, so their Z grows fastest. A group the loss ignores (∇_j L = 0) decays as
γ_j = (1 − κα/ν)^k, so Z_j → 1/κ: with λ·κ ≥ 1 it never enters.

The shrinkage is one-sided (Γ ≥ 0), as in the authors' SPP optimizer: yizhuoDi/Solution-Path-Pruning,
``adamw_spp.py`` at commit 63aa4369b2cd95208a15d7359235c5081194d516 (``_single_tensor_adamwprox``:
``g = (1 − λ/|z|).relu(); Γ = (g·z).relu()``, i.e. Γ = max(z − λ, 0)). DessiLBI's generic split-LBI
optimizer (DessiLBI2020/DessiLBI, ``DessiLBI/code/slbi_opt.py`` at dc57325fbe2b13c966d1d08e4e198d71c4b96711,
``SLBI.shrink``) is two-sided, which fits weights (a large negative weight matters as much as a large
positive one) but not gates: the entry order is read as importance, and a gate the loss drives
*negative* (the group hurts the loss) would cross −λ and enter the path like an important group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch


def soft_threshold(z: torch.Tensor, lam: float) -> torch.Tensor:
    """max(z − λ, 0), elementwise: the soft threshold clamped to Γ ≥ 0.

    One-sided because a gate's sign is not symmetric: a positive Z means the loss held the gate up
    (the group helps), a negative one that the loss pushed it below zero (the group hurts). Only the
    former may enter the path, or the entry order would rank harmful groups as important. This is
    the authors' rule (yizhuoDi/Solution-Path-Pruning, ``adamw_spp.py`` @ 63aa4369b2cd95208a15d7359235c5081194d516:
    ``((1 − λ/|z|).relu()·z).relu()``); DessiLBI's ``SLBI.shrink`` (DessiLBI2020/DessiLBI,
    ``DessiLBI/code/slbi_opt.py`` @ dc57325fbe2b13c966d1d08e4e198d71c4b96711) is the two-sided
    sign(z)·max(|z| − λ, 0) meant for weights.
    """
    return (z - lam).clamp(min=0)


@dataclass(frozen=True)
class LbiSettings:
    """κ, λ, ν, the step size α and the number of steps of the iteration."""

    kappa: float
    lam: float
    nu: float
    lr: float
    steps: int


@dataclass
class SolutionPath:
    """What the iteration left: per group its entry step (``inf``: never entered) and final Z, γ, Γ."""

    entry: torch.Tensor  # float64, 1-based step, inf for groups that never entered
    z: torch.Tensor
    gamma: torch.Tensor
    big_gamma: torch.Tensor
    losses: list[float] = field(default_factory=list)

    @property
    def entered(self) -> int:
        return int(torch.isfinite(self.entry).sum())

    def order(self) -> list[int]:
        """Group indices, most important first.

        By entry step (earlier first; groups that never entered after all that did); then by the
        signed Z, larger first (a larger Z crossed λ by more, or came nearer to it; a negative Z
        means the loss pushed the gate below zero, so the group hurts and ranks last); then by the
        signed final γ, larger first; then by index (layer order, then group order), so ties are
        broken the same way every time. Signed, not |Z|: Γ = κ·max(Z − λ, 0) is monotone in the
        signed Z, so a larger Z is nearer to entering, and a negative one (which the two-sided
        threshold would eventually let in, and |Z| would rank high) is the farthest. The reference
        ranks by time on the path alone (``deit_search.py`` saves each gate's ``step_record``, the
        count of checks with Γ ≠ 0, and ``deit/engine.py``'s ``set_alpha_sparsity`` keeps α ≥ a
        threshold), leaving never-entered groups tied; Z is this toolkit's tie-break.
        """
        entry, z, gamma = self.entry.tolist(), self.z.tolist(), self.gamma.tolist()
        return sorted(range(len(entry)), key=lambda j: (entry[j], -z[j], -gamma[j], j))


def split_lbi(loss: Callable[[torch.Tensor], torch.Tensor], gamma0: torch.Tensor, settings: LbiSettings, *,
              on_step: Callable[[int, float, int], None] | None = None) -> SolutionPath:
    """Run the iteration of the module docstring; ``loss(γ)`` is the task loss on the next batch.

    ``on_step(step, loss, entered)`` is called after every step (1-based).
    """
    kappa, lam, nu, lr = settings.kappa, settings.lam, settings.nu, settings.lr
    gamma = gamma0.detach().clone().double()
    z = torch.zeros_like(gamma)
    big = torch.zeros_like(gamma)
    entry = torch.full_like(gamma, math.inf)
    losses: list[float] = []
    for step in range(1, settings.steps + 1):
        current = gamma.to(gamma0.dtype).requires_grad_(True)
        value = loss(current)
        (grad,) = torch.autograd.grad(value, current)
        if not torch.isfinite(value):
            raise FloatingPointError(f"spp: the task loss became {float(value)} at step {step}; lower lr")
        diff = gamma - big
        gamma = gamma - kappa * lr * (grad.double() + diff / nu)
        z = z + lr * diff / nu
        big = kappa * soft_threshold(z, lam)
        entry[(big != 0) & torch.isinf(entry)] = step
        losses.append(float(value.detach()))
        if on_step is not None:
            on_step(step, losses[-1], int(torch.isfinite(entry).sum()))
    return SolutionPath(entry=entry, z=z, gamma=gamma, big_gamma=big, losses=losses)


Target = Literal["params", "groups"]


@dataclass(frozen=True)
class Shared:
    """Parameters two units' groups hold together: removing group a of ``first`` or group b of
    ``second`` removes the ``per_pair`` parameters at (a, b) — e.g. a ResNet bottleneck's conv2
    kernel (k×k) joining input channel a (a conv1 channel) and output channel b (a conv2 channel).
    ``sizes`` count them in both groups; :func:`removed_params` counts them once."""

    first: slice
    second: slice
    per_pair: int


def removed_params(remove: torch.Tensor, sizes: torch.Tensor, shared: tuple[Shared, ...] = ()) -> float:
    """Parameters that removing the groups where ``remove`` is True takes away, shared ones once."""
    total = float(sizes[remove].sum())
    for pair in shared:
        total -= float(remove[pair.first].sum()) * float(remove[pair.second].sum()) * pair.per_pair
    return total


def removal_count(ratio: float, sizes: torch.Tensor, order: list[int], target: Target,
                  shared: tuple[Shared, ...] = ()) -> int:
    """How many groups, from the least important end of ``order``, a ``ratio`` removes.

    ``groups``: ⌊ratio·G + ½⌋ groups. ``params``: the count whose removed parameters (shared ones
    counted once, :func:`removed_params`) are closest to ratio·P, P the parameters all G groups
    hold together; on a tie the smaller count.
    """
    n = len(order)
    if target == "groups":
        return min(n, math.floor(ratio * n + 0.5))
    goal = ratio * removed_params(torch.ones(n, dtype=torch.bool), sizes, shared)
    partners: dict[int, list[tuple[int, int]]] = {}  # gate → (pair index, 0 if in first else 1)
    for index, pair in enumerate(shared):
        for side, gates in enumerate((pair.first, pair.second)):
            for j in range(gates.start, gates.stop):
                partners.setdefault(j, []).append((index, side))
    gone = [[0, 0] for _ in shared]  # groups removed so far on each side of each pair
    removed, best, best_gap = 0.0, 0, goal
    for count, j in enumerate(reversed(order), start=1):
        removed += float(sizes[j])
        for index, side in partners.get(j, ()):
            removed -= gone[index][1 - side] * shared[index].per_pair  # already taken with the partner
            gone[index][side] += 1
        gap = abs(removed - goal)
        if gap < best_gap - 1e-9:
            best, best_gap = count, gap
        if removed > goal:
            break
    return best


def removal_mask(order: list[int], count: int) -> torch.Tensor:
    """Boolean vector in gate order: True for the ``count`` least important groups."""
    mask = torch.zeros(len(order), dtype=torch.bool)
    if count:
        mask[torch.tensor(order[len(order) - count:])] = True
    return mask
