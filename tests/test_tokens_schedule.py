"""Token schedules against the seed's formula, in both of its readings (current and original count)."""

from __future__ import annotations

import math

import pytest

from rmtp_plugins.tokens.schedule import keep_ratios, merged_count, token_counts, tome_r_list

#: Seed 001 §4.3: tokens per layer (class token included) of its 8-block ViT on 1 + 144 tokens,
#: r_max = 0.6, α = 2, pruning applied to the tokens each layer receives.
SEED_TOKENS_PER_LAYER = [143, 137, 125, 106, 81, 54, 29, 12]


def seed_keep_ratio(layer: int, n_layers: int, r_max: float, alpha: float) -> float:
    """The seed's formula, verbatim: keep_ratio(l) = 1 − r_max * ((l + 1) / L)^alpha."""
    return 1 - r_max * ((layer + 1) / n_layers) ** alpha


def test_keep_ratios_are_the_seeds_formula() -> None:
    for depth, r_max, alpha in [(8, 0.6, 2.0), (12, 0.6, 1.5), (6, 0.3, 1.2), (12, 0.9, 3.0)]:
        expected = [seed_keep_ratio(block, depth, r_max, alpha) for block in range(depth)]
        assert keep_ratios(depth, r_max, alpha) == pytest.approx(expected, abs=1e-15)


def test_current_count_reproduces_the_seeds_published_token_counts() -> None:
    counts = token_counts(144, keep=keep_ratios(8, 0.6, 2.0), relative_to="current")
    assert [1 + out for _, out in counts] == SEED_TOKENS_PER_LAYER
    assert [n_in for n_in, _ in counts] == [144] + [t - 1 for t in SEED_TOKENS_PER_LAYER[:-1]]


@pytest.mark.parametrize("depth", [6, 8, 12])
@pytest.mark.parametrize("r_max", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("alpha", [1, 2, 3])
@pytest.mark.parametrize("n0", [64, 144, 196])
def test_current_count_compounds_the_formula(depth: int, r_max: float, alpha: int, n0: int) -> None:
    """current: n_{l+1} = ⌊n_l · keep(l)⌋ (at least 1), checked in exact rational arithmetic."""
    from fractions import Fraction

    n, expected = n0, []
    for layer in range(depth):
        keep = 1 - Fraction(r_max).limit_denominator(100) * Fraction(layer + 1, depth) ** alpha
        n = max(1, math.floor(n * keep))
        expected.append(n)
    got = [out for _, out in token_counts(n0, keep=keep_ratios(depth, r_max, alpha), relative_to="current")]
    assert got == expected


@pytest.mark.parametrize("depth, r_max, alpha", [(8, 0.6, 2), (12, 0.6, 1), (12, 0.9, 3), (6, 0.3, 2)])
def test_original_count_applies_the_formula_to_the_first_blocks_tokens(depth: int, r_max: float, alpha: int) -> None:
    """original: block l keeps ⌊N₀ · keep(l)⌋ of the N₀ patches the first block saw (not compounding)."""
    from fractions import Fraction

    n0 = 144
    expected = [
        max(1, math.floor(n0 * (1 - Fraction(r_max).limit_denominator(100) * Fraction(block + 1, depth) ** alpha)))
        for block in range(depth)
    ]
    got = [out for _, out in token_counts(n0, keep=keep_ratios(depth, r_max, alpha), relative_to="original")]
    assert got == expected
    current = [out for _, out in token_counts(n0, keep=keep_ratios(depth, r_max, alpha), relative_to="current")]
    assert all(c <= o for c, o in zip(current, got)), "compounding never keeps more than the original-count reading"


def test_start_layer_and_min_tokens() -> None:
    keep = keep_ratios(8, 0.6, 2.0, start_layer=3)
    assert keep[:3] == [1.0, 1.0, 1.0] and keep[3] == pytest.approx(seed_keep_ratio(3, 8, 0.6, 2.0))
    counts = token_counts(144, keep=keep, relative_to="current")
    assert [out for _, out in counts][:3] == [144, 144, 144]
    tiny = token_counts(10, keep=[0.1] * 4, relative_to="current", min_tokens=2)
    assert [out for _, out in tiny] == [2, 2, 2, 2]


def test_tome_r_schedule_is_tomes_parse_r() -> None:
    def parse_r(num_layers: int, r: int, inflect: float = 0.0) -> list[int]:  # ToMe's tome/utils.py
        min_val = int(r * (1.0 - inflect))
        max_val = 2 * r - min_val
        step = (max_val - min_val) / (num_layers - 1)
        return [int(min_val + step * i) for i in range(num_layers)]

    for depth, r, ramp in [(12, 13, 0.0), (12, 16, 0.5), (12, 8, -0.5), (6, 8, 1.0)]:
        assert tome_r_list(depth, r, ramp) == parse_r(depth, r, ramp)
    counts = token_counts(196, r=tome_r_list(12, 13))
    assert [out for _, out in counts][-1] == 196 - 12 * 13  # ViT-S/16: 197 → 41 tokens
    assert merged_count(5, 4) == 3 and merged_count(4, 4) == 2, "at most half of the tokens merge"
