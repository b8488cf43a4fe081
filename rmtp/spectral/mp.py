"""The Marchenko–Pastur law and the fit of a weight matrix's spectrum to it.

Pure math on arrays: no models, no I/O. Notation (``docs/spectral.md`` has the derivations):

- ``W`` is M×N, ``p = min(M, N)``, ``n = max(M, N)``, aspect ratio ``gamma = p / n`` in (0, 1];
- eigenvalues ``lambda = s**2 / n`` for the ``p`` singular values ``s`` of ``W``;
- for ``W`` with i.i.d. entries of variance ``sigma2`` the eigenvalues follow MP(gamma, sigma2),
  supported on ``sigma2 * [(1 - sqrt(gamma))**2, (1 + sqrt(gamma))**2]`` (no atom at 0, since only
  the ``p`` non-trivial eigenvalues are counted).

Everything is evaluated in the angle ``theta`` of ``x = 1 + gamma - 2 sqrt(gamma) cos(theta)``
(sigma2 = 1), in which the CDF has the closed form

    F(theta) = (2/pi) * (theta/2 + sin(theta)/(2r) - (1 - r**2)/(2 r**2) * phi),
    phi = atan2(r sin(theta), 1 - r cos(theta)),  r = sqrt(gamma),

and the density in ``theta``, ``(2/pi) sin(theta)**2 / (1 + gamma - 2 r cos(theta))``, is bounded
for every gamma, including gamma = 1 where the density in ``x`` diverges at 0. For r < 0.1 the
O(1/r) terms of that form are expanded in a series (they cancel), so gamma -> 0 (the semicircle
limit) loses no precision either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

#: Below this r = sqrt(gamma) the CDF uses its series form (see the module docstring).
_SERIES_BELOW = 0.1
#: Terms of that series: r**(k-2) < 1e-30 at r < 0.1 for k > 32.
_SERIES_TERMS = 34
#: Points of the cached (theta, F) table that seeds the quantile solver.
_TABLE_POINTS = 1025


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1] (min/max aspect ratio), got {gamma!r}")
    return gamma


def _check_sigma2(sigma2: float) -> float:
    sigma2 = float(sigma2)
    if not sigma2 > 0.0 or not math.isfinite(sigma2):
        raise ValueError(f"sigma2 must be a positive finite number, got {sigma2!r}")
    return sigma2


def mp_edges(gamma: float, sigma2: float = 1.0) -> tuple[float, float]:
    """The support ``(lambda_minus, lambda_plus) = sigma2 * (1 -+ sqrt(gamma))**2``."""
    gamma, sigma2 = _check_gamma(gamma), _check_sigma2(sigma2)
    r = math.sqrt(gamma)
    return sigma2 * (1.0 - r) ** 2, sigma2 * (1.0 + r) ** 2


def mp_pdf(x: np.ndarray | float, gamma: float, sigma2: float = 1.0) -> np.ndarray:
    """MP(gamma, sigma2) density ``sqrt((b - x)(x - a)) / (2 pi gamma sigma2 x)``; 0 outside (a, b)."""
    gamma, sigma2 = _check_gamma(gamma), _check_sigma2(sigma2)
    x = np.asarray(x, dtype=np.float64) / sigma2
    a, b = mp_edges(gamma)
    out = np.zeros_like(x)
    inside = (x > a) & (x < b)
    xi = x[inside]
    out[inside] = np.sqrt((b - xi) * (xi - a)) / (2.0 * math.pi * gamma * xi)
    return out / sigma2


def _theta_of_x(x: np.ndarray, gamma: float) -> np.ndarray:
    """The angle of ``x`` (sigma2 = 1), clipped to [0, pi] outside the support.

    ``x - a = 4 r sin(theta/2)^2`` and ``b - x = 4 r cos(theta/2)^2``: each half of the support
    uses the form that stays accurate at its own end (arccos would lose half the digits there).
    """
    r = math.sqrt(gamma)
    low = np.clip((x - (1.0 - r) ** 2) / (4.0 * r), 0.0, 1.0)
    high = np.clip(((1.0 + r) ** 2 - x) / (4.0 * r), 0.0, 1.0)
    return np.where(low <= 0.5, 2.0 * np.arcsin(np.sqrt(low)), math.pi - 2.0 * np.arcsin(np.sqrt(high)))


def _cdf_theta(theta: np.ndarray, gamma: float) -> np.ndarray:
    """F at angle ``theta`` in [0, pi] (closed form; series for small gamma)."""
    r = math.sqrt(gamma)
    sin, cos = np.sin(theta), np.cos(theta)
    if r >= _SERIES_BELOW:
        phi = np.arctan2(r * sin, 1.0 - r * cos)
        value = theta / 2.0 + sin / (2.0 * r) - (1.0 - gamma) / (2.0 * gamma) * phi
    else:
        tail = np.zeros_like(theta)
        for k in range(_SERIES_TERMS, 2, -1):  # smallest terms first
            tail += r ** (k - 2) * np.sin(k * theta) / k
        value = theta / 2.0 + r * sin / 2.0 - (1.0 - gamma) * np.sin(2.0 * theta) / 4.0 - (1.0 - gamma) / 2.0 * tail
    return np.clip(value * (2.0 / math.pi), 0.0, 1.0)


def _pdf_theta(theta: np.ndarray, gamma: float) -> np.ndarray:
    """dF/dtheta = (2/pi) sin(theta)^2 / (1 + gamma - 2 sqrt(gamma) cos(theta)), bounded for all gamma."""
    r = math.sqrt(gamma)
    half = np.sin(theta / 2.0)
    sin = np.sin(theta)
    denominator = (1.0 - r) ** 2 + 4.0 * r * half * half
    with np.errstate(divide="ignore", invalid="ignore"):
        value = sin * sin / denominator
    # gamma = 1 at theta = 0: 0/0, whose limit is cos(theta/2)^2 = 1
    return (2.0 / math.pi) * np.where(denominator > 0.0, value, 1.0)


def mp_cdf(x: np.ndarray | float, gamma: float, sigma2: float = 1.0) -> np.ndarray:
    """MP(gamma, sigma2) cumulative distribution function, in closed form (exact to rounding)."""
    gamma, sigma2 = _check_gamma(gamma), _check_sigma2(sigma2)
    x = np.asarray(x, dtype=np.float64) / sigma2
    return _cdf_theta(_theta_of_x(x, gamma), gamma)


@lru_cache(maxsize=256)
def _quantile_table(gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """(theta, F(theta)) on a uniform grid of [0, pi]: the cached start of the quantile solver."""
    theta = np.linspace(0.0, math.pi, _TABLE_POINTS)
    cdf = _cdf_theta(theta, gamma)
    cdf[0], cdf[-1] = 0.0, 1.0
    cdf = np.maximum.accumulate(cdf)  # guard against rounding noise where F is flat (theta^3 ends)
    theta.flags.writeable = False
    cdf.flags.writeable = False
    return theta, cdf


def _theta_quantile(p: np.ndarray, gamma: float) -> np.ndarray:
    """Solve F(theta) = p: table bracket, then safeguarded Newton steps to machine precision."""
    grid, table = _quantile_table(gamma)
    upper = np.clip(np.searchsorted(table, p, side="left"), 1, len(grid) - 1)
    lo, hi = grid[upper - 1].copy(), grid[upper].copy()
    theta = np.interp(p, table, grid)
    for _ in range(100):
        err = _cdf_theta(theta, gamma) - p
        below = err < 0
        lo = np.where(below, theta, lo)
        hi = np.where(below, hi, theta)
        slope = _pdf_theta(theta, gamma)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = theta - err / slope
        bisect = ~((step >= lo) & (step <= hi))  # Newton left the bracket (or slope 0): halve it
        new = np.where(bisect, 0.5 * (lo + hi), step)
        moved = np.abs(new - theta)
        theta = new
        if np.all((moved <= 4e-16 * math.pi) | (hi - lo <= 4e-16 * math.pi)):
            break
    return theta


def mp_quantile(p: np.ndarray | float, gamma: float) -> np.ndarray:
    """The MP(gamma, 1) quantile function: the x with F(x) = p, for each p in [0, 1].

    Exact to rounding (the closed-form CDF inverted by safeguarded Newton), vectorised, and
    seeded from a table cached per gamma. Multiply by sigma2 for MP(gamma, sigma2).
    """
    gamma = _check_gamma(gamma)
    p = np.asarray(p, dtype=np.float64)
    if np.any(~np.isfinite(p)) or np.any((p < 0.0) | (p > 1.0)):
        raise ValueError("probabilities must lie in [0, 1]")
    theta = _theta_quantile(p.ravel(), gamma).reshape(p.shape)
    r = math.sqrt(gamma)
    half = np.sin(theta / 2.0)
    x = (1.0 - r) ** 2 + 4.0 * r * half * half  # = 1 + gamma - 2 r cos(theta), without cancellation near a
    a, b = (1.0 - r) ** 2, (1.0 + r) ** 2
    return np.where(p <= 0.0, a, np.where(p >= 1.0, b, x))


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The 2-D matrix a weight acts as: Linear ``(out, in)`` as is, conv ``(out, in, kh, kw)`` as ``(out, in*kh*kw)``.

    A view (no copy) of a contiguous weight, detached from autograd.
    """
    if weight.ndim < 2:
        raise ValueError(f"a weight matrix needs at least 2 dimensions, got shape {tuple(weight.shape)}")
    return weight.detach().reshape(weight.shape[0], -1)


def band_levels(p: int, alpha: float) -> np.ndarray:
    """Indices (into ascending order) of the eigenvalues BEMA fits: plotting positions (i + 1/2)/p in
    [alpha, 1 - alpha]."""
    levels = (np.arange(p) + 0.5) / p
    return np.flatnonzero((levels >= alpha - 1e-12) & (levels <= 1.0 - alpha + 1e-12))


@lru_cache(maxsize=512)
def _band_quantiles(p: int, gamma: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    index = band_levels(p, alpha)
    q = mp_quantile((index + 0.5) / p, gamma)
    index.flags.writeable = False
    q.flags.writeable = False
    return index, q


def tw_edge_margin(gamma: float, n: int, confidence: float) -> float:
    """The Tracy–Widom margin added to the edge (sigma2 = 1): ``t * n^(-2/3) * (1 + sqrt(gamma))^(4/3) * gamma^(-1/6)``.

    ``t`` is the TW1 quantile at ``confidence`` (real matrices: beta = 1). The factor is the
    Johnstone (2001) scale of the largest eigenvalue of a white Wishart matrix in the
    normalisation ``lambda = s**2 / n``. ``confidence`` must be at least F_TW1(0) ~ 0.832, so the
    margin is never negative: a margin exists to make the edge *more* conservative.
    """
    from rmtp.spectral.tracy_widom import tw1_quantile  # scipy.special: imported only when a margin is asked for

    gamma = _check_gamma(gamma)
    t = tw1_quantile(check_tw_confidence(confidence))
    return t * n ** (-2.0 / 3.0) * (1.0 + math.sqrt(gamma)) ** (4.0 / 3.0) * gamma ** (-1.0 / 6.0)


def check_tw_confidence(confidence: float) -> float:
    """``confidence`` as a float, or ValueError where it would make the TW margin negative or undefined."""
    from rmtp.spectral.tracy_widom import TW1_CDF_AT_ZERO

    confidence = float(confidence)
    if not confidence < 1.0:
        raise ValueError(f"tw_confidence must be below 1, got {confidence!r}")
    if not confidence >= TW1_CDF_AT_ZERO:
        raise ValueError(
            f"tw_confidence must be at least {TW1_CDF_AT_ZERO:.4f} = F_TW1(0), got {confidence!r}: below it the "
            f"Tracy–Widom quantile is negative and the 'margin' would pull the edge under (1+sqrt(gamma))^2, "
            f"the opposite of conservative; leave it unset for the asymptotic edge"
        )
    return confidence


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha < 0.5:
        raise ValueError(f"alpha must be in [0, 0.5) (the share of eigenvalues left out at each end), got {alpha!r}")
    return alpha


#: The bulk counts as MP-like when its KS distance, counted in eigenvalues (``ks * m`` for m
#: bulk eigenvalues), is at most ``KS_LOG_SCALE * ln(m)``. Eigenvalues of a noise matrix are
#: rigid: their empirical CDF strays from the MP CDF by about ``0.45 ln(m)`` eigenvalues on
#: average and ``0.6 ln(m)`` at most over 40 seeds (Monte Carlo, m = 32…400, gamma = 0.05…1), so
#: noise is flagged essentially never, while i.i.d. samples' ``sqrt(m)`` would be far too loose:
#: it passes Cauchy matrices. Flagged at this scale: infinite-variance entries (Student t, 2 dof
#: and fewer) and column-scaled Gaussians (a generalised, not an MP, law).
KS_LOG_SCALE = 1.5


@dataclass(frozen=True)
class MPFit:
    """The MP fit of one matrix's spectrum (see :func:`fit_mp`)."""

    shape: tuple[int, int]
    gamma: float
    sigma2: float
    lambda_plus: float
    s_plus: float
    rank: int
    spikes: np.ndarray = field(repr=False, compare=False)
    spike_strengths: np.ndarray = field(repr=False, compare=False)
    ks: float
    bulk_is_mp: bool

    @property
    def sigma(self) -> float:
        """Fitted noise standard deviation per entry."""
        return math.sqrt(self.sigma2)

    @property
    def min_dim(self) -> int:
        return min(self.shape)

    @property
    def rank_fraction(self) -> float:
        """Signal rank k / min(M, N)."""
        return self.rank / self.min_dim

    def to_dict(self) -> dict[str, object]:
        return {
            "shape": list(self.shape), "gamma": self.gamma, "sigma": self.sigma, "sigma2": self.sigma2,
            "lambda_plus": self.lambda_plus, "s_plus": self.s_plus, "rank": self.rank,
            "rank_fraction": self.rank_fraction, "spikes": [float(v) for v in self.spikes],
            "spike_strengths": [float(v) for v in self.spike_strengths],
            "ks": self.ks, "bulk_is_mp": self.bulk_is_mp,
        }


#: Refits of sigma2 and the edge without the spikes found so far; the count settles in 2-3 on real
#: spectra (each refit lowers the edge, which can uncover spikes the previous one hid).
_REFITS = 16


def bulk_edge_s2(p: int, n: int, tw_confidence: float | None = None) -> float:
    """Squared singular-value edge of a p×n noise matrix with unit-variance entries (sigma2 = 1).

    ``(sqrt(n) + sqrt(p))**2 = n (1 + sqrt(p/n))**2``, plus ``n`` times the Tracy–Widom margin
    (:func:`tw_edge_margin`, in the normalisation ``lambda = s**2 / n``) when ``tw_confidence``
    is given. :func:`fit_mp` evaluates it at the size of the bulk left once the spikes are out.
    """
    gamma = p / n
    edge = (1.0 + math.sqrt(gamma)) ** 2
    if tw_confidence is not None:
        edge += tw_edge_margin(gamma, n, tw_confidence)
    return n * edge


def spike_strengths(spikes: np.ndarray, gamma: float, sigma2: float, n: int) -> np.ndarray:
    """The signal singular values ``theta`` whose BBP outliers are the eigenvalues ``spikes``.

    For ``W = sum theta_i u_i v_i^T + sigma G`` (G p×n with i.i.d. unit entries), a spike with
    ``t = theta / (sigma sqrt(n)) > gamma**(1/4)`` lands at ``lambda / sigma2 = (1 + t²)(gamma + t²) / t²``
    (Benaych-Georges & Nadakuditi 2012, Theorem 2.8). Solving that quadratic in ``t²`` for its
    larger root, ``t² = (x - 1 - gamma + sqrt((x - 1 - gamma)**2 - 4 gamma)) / 2`` with
    ``x = lambda / sigma2``, gives ``theta``; at and below the edge ``x = (1 + sqrt(gamma))**2`` the root
    is the threshold ``t = gamma**(1/4)`` itself (a spike found just over a TW margin is at least that).
    """
    x = np.asarray(spikes, dtype=np.float64) / sigma2
    b = x - 1.0 - gamma
    t2 = 0.5 * (b + np.sqrt(np.clip(b * b - 4.0 * gamma, 0.0, None)))
    t2 = np.maximum(t2, math.sqrt(gamma))
    return np.sqrt(t2 * sigma2 * n)


def _bema_sigma2(s_ascending: np.ndarray, p: int, n: int, alpha: float) -> float:
    """Least squares through the origin of the band eigenvalues s²/n on the MP(p/n, 1) quantiles."""
    index, q = _band_quantiles(p, p / n, alpha)
    if index.size == 0:
        raise ValueError(f"no eigenvalue of {p} falls in the central band [{alpha}, {1 - alpha}]")
    band = s_ascending[index]
    return float(np.dot(q, band * band) / n / np.dot(q, q))


def fit_mp(
    singular_values: torch.Tensor | np.ndarray,
    shape: tuple[int, int],
    *,
    alpha: float = 0.25,
    tw_confidence: float | None = None,
) -> MPFit:
    """Fit MP(gamma, sigma2) to the spectrum of an M×N matrix from its ``min(M, N)`` singular values.

    sigma2 by BEMA: least squares through the origin of the sorted eigenvalues whose plotting
    positions lie in [alpha, 1 - alpha] against the MP(gamma, 1) quantiles at those positions
    (the central band is untouched by spikes above and by the soft lower edge), repeated on the
    p - k bulk values of a (p-k)×(n-k) noise matrix once k spikes are found, until k is stable.
    The singular-value edge is that bulk's, ``s_plus = sigma (sqrt(n-k) + sqrt(p-k))`` (plus the
    Tracy–Widom margin of a (p-k)×(n-k) matrix, :func:`bulk_edge_s2`, when ``tw_confidence`` is
    given), reported as ``lambda_plus = s_plus**2 / n``; the signal rank counts the singular values
    above ``s_plus``, and ``spike_strengths`` back-maps each spike to the signal singular value
    that produces it (:func:`spike_strengths`). ``ks`` is the Kolmogorov–Smirnov distance
    between the bulk (the eigenvalues at or below the edge) and its fitted MP CDF; ``bulk_is_mp``
    compares it with :data:`KS_LOG_SCALE`. The singular values may come in any order, as a tensor
    or an array. See ``docs/spectral.md``.
    """
    m_rows, n_cols = (int(d) for d in shape)
    if m_rows < 1 or n_cols < 1:
        raise ValueError(f"shape must be two positive sizes, got {shape!r}")
    p, n = min(m_rows, n_cols), max(m_rows, n_cols)
    gamma = p / n
    alpha = check_alpha(alpha)
    if isinstance(singular_values, torch.Tensor):
        singular_values = singular_values.detach().to("cpu", torch.float64).numpy()
    s = np.asarray(singular_values, dtype=np.float64).ravel()
    if s.size != p:
        raise ValueError(f"a {m_rows}×{n_cols} matrix has {p} singular values, got {s.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("singular values must be finite")
    s = np.sort(np.abs(s))
    lam = s * s / n

    # BEMA, refitted without the spikes found: a rank-k signal leaves a (p-k)×(n-k) noise matrix
    # behind, whose eigenvalues s²/(n-k) follow MP((p-k)/(n-k), sigma2). Fitting all p as if they
    # were noise would read the k spikes' slots as bulk and overestimate sigma2 by O(k/p); and the
    # bulk's top is that smaller matrix's edge, sigma (sqrt(n-k) + sqrt(p-k)), not the full-size
    # one: keeping the full-size edge hides weak spikes behind many strong ones.
    max_removed = int(alpha * p)  # spikes beyond the band's upper end would eat into the band itself
    rank, removed = 0, 0
    for _ in range(_REFITS):
        sigma2 = _bema_sigma2(s[: p - removed], p - removed, n - removed, alpha)
        s_plus = math.sqrt(sigma2 * bulk_edge_s2(p - removed, n - removed, tw_confidence))
        rank = int(p - np.searchsorted(s, s_plus, side="right"))  # #{s > s_plus}
        if min(rank, max_removed) == removed:
            break
        removed = min(rank, max_removed)
    lambda_plus = s_plus * s_plus / n
    spikes = (lam[p - rank:])[::-1].copy()
    strengths = spike_strengths(spikes, gamma, sigma2, n) if sigma2 > 0.0 else np.full(rank, np.inf)

    bulk_s = s[: p - rank]
    if sigma2 > 0.0 and bulk_s.size:
        bulk_n = n - rank
        cdf = mp_cdf(bulk_s * bulk_s / bulk_n, bulk_s.size / bulk_n, sigma2)
        m = bulk_s.size
        steps = np.arange(1, m + 1) / m
        ks = float(max(np.max(steps - cdf), np.max(cdf - (steps - 1.0 / m))))
        bulk_is_mp = ks * m <= KS_LOG_SCALE * max(math.log(m), 1.0) and rank <= max_removed
    else:  # a zero band (exactly low-rank or mostly zero matrix): no noise bulk to speak of
        ks, bulk_is_mp = 1.0, False
    spikes.flags.writeable = False
    strengths.flags.writeable = False
    return MPFit(shape=(m_rows, n_cols), gamma=gamma, sigma2=sigma2, lambda_plus=lambda_plus, s_plus=s_plus,
                 rank=rank, spikes=spikes, spike_strengths=strengths, ks=ks, bulk_is_mp=bulk_is_mp)
