"""Layer budgets of the ``n:m`` pruner: the Marchenko–Pastur signal and the allocation under a MAC target.

**Signal.** For layer l (its GEMM matrix W, M×N; a fused qkv as its q, k, v blocks) the MP law is
fitted to the singular values (:func:`rmtp.spectral.mp.fit_mp`, BEMA), giving the singular-value
edge σ₊ of the noise bulk. The layer's signal share is the energy standing above that edge:

    u_l = Σ_i max(s_i² − σ₊², 0) / Σ_i s_i²            (summed over the blocks of a fused qkv)

≈ 0 for a matrix that is pure noise, → 1 for a strongly low-rank one. Across the selected layers
it is standardised, z_l = clip((u_l − mean u) / std u, ±3), and turned into a layer factor
c_l = exp(z_scale · z_l): layers whose spectrum stands high above their MP edge get c_l > 1.

**Allocation.** Per-weight scores s (|w| or Wanda's |w|·‖x‖) are made comparable across layers by
the layer's RMS score and scaled by the layer factor: s̃ = c_l · s / rms_l(s). Keeping the
globally highest s̃ is the unstructured global ranking; with N:M the unit of choice is a layer's
pattern, so the same objective — the total removed score energy — is minimised over the per-layer
choices among the allowed patterns:

    minimise  Σ_l D_l(p_l),   D_l(p) = Σ_{weights p removes} s̃²
    subject to  Σ_l MACs_l · density(p_l) ≤ target_macs · Σ_l MACs_l

(a multiple-choice knapsack; density(n:m) = n/m, dense = 1). Solved greedily on each layer's lower
convex hull of (cost, damage): start every layer at its sparsest option, then repeatedly take the
upgrade with the largest damage reduction per MAC that still fits.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch

from rmtp.spectral.mp import MPFit, fit_mp

#: z-scores are clipped to this many standard deviations.
Z_CLIP = 3.0


@dataclass
class Signal:
    """The MP signal of one layer: its share of energy above the edge, and the fits behind it."""

    share: float | None
    fits: list[MPFit]
    skipped: str | None = None

    @property
    def edge(self) -> float | None:
        return self.fits[0].s_plus if len(self.fits) == 1 else None


def mp_signal(matrix: torch.Tensor, blocks: dict[str, slice] | None, *, alpha: float,
              tw_confidence: float | None, min_dim: int) -> Signal:
    """:math:`u_l` of the module docstring for one GEMM matrix (rows split into ``blocks`` if given)."""
    matrix = matrix.detach().to("cpu", torch.float64)
    excess, energy, fits = 0.0, 0.0, []
    for rows in (blocks or {"": slice(0, matrix.shape[0])}).values():
        part = matrix[rows]
        if min(part.shape) < min_dim:
            return Signal(None, [], skipped=f"min(M,N)={min(part.shape)} < min_dim={min_dim}")
        s = torch.linalg.svdvals(part)
        fit = fit_mp(s, tuple(part.shape), alpha=alpha, tw_confidence=tw_confidence)
        fits.append(fit)
        s2 = s * s
        excess += float((s2 - fit.s_plus ** 2).clamp(min=0).sum())
        energy += float(s2.sum())
    return Signal(excess / energy if energy > 0 else 0.0, fits)


def z_scores(values: list[float | None]) -> list[float]:
    """Standardised values (population std), clipped to ±:data:`Z_CLIP`; ``None`` and a constant list give 0."""
    known = np.array([v for v in values if v is not None], dtype=np.float64)
    if known.size < 2 or known.std() < 1e-12:
        return [0.0] * len(values)
    mean, std = known.mean(), known.std()
    return [0.0 if v is None else float(np.clip((v - mean) / std, -Z_CLIP, Z_CLIP)) for v in values]


@dataclass(frozen=True)
class Option:
    """One choice for one layer: a pattern (``None`` = dense), its MAC cost and its damage."""

    pattern: tuple[int, int] | None
    cost: float
    damage: float


def _hull(options: list[Option]) -> list[Option]:
    """Lower convex hull of (cost, damage), cheapest first, damage strictly decreasing."""
    best: dict[float, Option] = {}
    for option in options:
        if option.cost not in best or option.damage < best[option.cost].damage:
            best[option.cost] = option
    points = sorted(best.values(), key=lambda o: o.cost)
    frontier: list[Option] = []
    for option in points:
        if frontier and option.damage >= frontier[-1].damage:
            continue  # costs more, damages no less: never worth it
        while len(frontier) >= 2:
            a, b = frontier[-2], frontier[-1]
            # b is above the segment a→option: skipping it gives a better rate
            if (b.damage - a.damage) * (option.cost - a.cost) >= (option.damage - a.damage) * (b.cost - a.cost):
                frontier.pop()
            else:
                break
        frontier.append(option)
    return frontier


def allocate(layers: list[list[Option]], budget: float) -> list[Option]:
    """Greedy multiple-choice knapsack: one option per layer, total cost ≤ ``budget`` where possible,
    total damage minimised along each layer's convex hull. If even the cheapest options exceed the
    budget, the cheapest are returned."""
    hulls = [_hull(options) for options in layers]
    chosen = [0] * len(hulls)
    used = sum(h[0].cost for h in hulls)
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        step = chosen[i]
        if step + 1 < len(hulls[i]):
            a, b = hulls[i][step], hulls[i][step + 1]
            rate = (a.damage - b.damage) / max(b.cost - a.cost, 1e-300)
            heapq.heappush(heap, (-rate, i))

    for i in range(len(hulls)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        a, b = hulls[i][chosen[i]], hulls[i][chosen[i] + 1]
        extra = b.cost - a.cost
        if used + extra > budget * (1 + 1e-12):
            continue  # this layer cannot afford its next step; smaller upgrades elsewhere still may
        chosen[i] += 1
        used += extra
        push(i)
    return [h[c] for h, c in zip(hulls, chosen)]


def layer_factor(z: float, z_scale: float) -> float:
    return math.exp(z_scale * z)
