"""How many tokens each block keeps: the pure arithmetic behind the token pruners' schedules.

Counts here are *patch* tokens (prefix tokens: class and register tokens are never reduced and
never counted). Every function is plain Python on ints and floats, so the patched forward pass
derives each block's output count from the input's shape alone: counts are static for a given
input size (dense batches, no ``torch.compile`` recompiles), and the pruner's per-block report
uses the very same functions as the forward pass.

Pruning schedule (``token-cls``, ``token-mean``; the seed's)::

    keep(l) = 1 − r_max · ((l + 1) / L)^α        l = 0 … L−1, L = number of blocks
    keep(l) = 1                                  for l < start_layer

applied either to the **current** count (compounding, as the seed does: the seed's 8-block model
with 144 patches, r_max = 0.6, α = 2 keeps 142, 136, 124, 105, 80, 53, 28, 11 patches), or to the
**original** count (block ``l`` keeps ``keep(l)`` of the patches the first block saw)::

    current:  n_{l+1} = max(min_tokens, ⌊n_l · keep(l)⌋)
    original: n_{l+1} = min(n_l, max(min_tokens, ⌊N_0 · keep(l)⌋))

Merging schedule (``tome``): ``r`` tokens merged per block, at most half of the current patches::

    n_{l+1} = n_l − min(r_l, ⌊n_l / 2⌋)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

RelativeTo = Literal["current", "original"]

#: Guards ⌊n · keep⌋ against float rounding (144 · 0.85 = 122.39999…, 80 · 0.6625 = 52.999…).
_EPS = 1e-9


def keep_ratios(depth: int, r_max: float, alpha: float, start_layer: int = 0) -> list[float]:
    """``keep(l) = 1 − r_max·((l+1)/L)^α`` for each of the ``depth`` blocks (1.0 before ``start_layer``)."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    return [1.0 if layer < start_layer else 1.0 - r_max * ((layer + 1) / depth) ** alpha
            for layer in range(depth)]


def pruned_count(n: int, n0: int, keep: float, relative_to: RelativeTo = "current", min_tokens: int = 1) -> int:
    """Patch tokens left after a block with keep ratio ``keep`` that received ``n`` (the first block ``n0``)."""
    if keep >= 1.0:
        return n
    base = n if relative_to == "current" else n0
    return min(n, max(min_tokens, math.floor(base * keep + _EPS)))


def tome_r_list(depth: int, r: int, ramp: float = 0.0) -> list[int]:
    """ToMe's per-block ``r`` (its ``parse_r``): constant ``r``, or a linear ramp with the same total.

    ``ramp`` in [-1, 1] is ToMe's inflection: block 0 merges ``int(r·(1−ramp))``, the last block
    ``2r − int(r·(1−ramp))`` (more merging late for ``ramp > 0``, early for ``ramp < 0``).
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    first = int(r * (1.0 - ramp))
    last = 2 * r - first
    step = (last - first) / (depth - 1) if depth > 1 else 0.0
    return [int(first + step * layer) for layer in range(depth)]


def merged_count(n: int, r: int) -> int:
    """Patch tokens left after merging ``r`` of ``n`` (bipartite matching merges at most ``⌊n/2⌋``)."""
    return n - min(r, n // 2)


def token_counts(n0: int, *, keep: Sequence[float] | None = None, r: Sequence[int] | None = None,
                 relative_to: RelativeTo = "current", min_tokens: int = 1) -> list[tuple[int, int]]:
    """``(patches in, patches out)`` of every block for ``n0`` patches entering the first block."""
    if (keep is None) == (r is None):
        raise ValueError("give exactly one of keep (pruning) or r (merging)")
    counts, n = [], n0
    for step in (keep if keep is not None else r):
        out = pruned_count(n, n0, step, relative_to, min_tokens) if keep is not None else merged_count(n, step)
        counts.append((n, out))
        n = out
    return counts
