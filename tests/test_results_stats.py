"""The statistics of the results store: interval coverage, the paired test's level and power."""

import numpy as np
import pytest

from osftkit.results.stats import (
    hierarchical_interval,
    hierarchical_ratio_interval,
    holm,
    paired_difference,
    sample_sd,
    seed_interval,
)

TRUE_MEAN = 0.6


def difficulty(rng: np.random.Generator, problems: int = 100) -> np.ndarray:
    """Each problem's offset from the mean score (zero mean, shared by every seed and arm)."""
    return 0.6 * (rng.beta(2, 2, size=problems) - 0.5)


def simulated_scores(
    rng: np.random.Generator, offsets: np.ndarray, seeds: int = 5, mean: float = TRUE_MEAN
) -> np.ndarray:
    """(seeds, problems) pass@1 of 8 samples: a training-seed effect, the problems' offsets,
    binomial sampling noise; the expected score is `mean`."""
    seed_effect = 0.03 * rng.standard_normal(seeds)
    p = mean + seed_effect[:, None] + offsets[None, :]
    return rng.binomial(8, np.clip(p, 0, 1)) / 8


def coverage(simulations: int, resamples: int) -> float:
    hits = 0
    for i in range(simulations):
        rng = np.random.default_rng(i)
        scores = simulated_scores(rng, difficulty(rng))
        estimate = hierarchical_interval(scores, resamples=resamples, seed=i)
        hits += estimate.low <= TRUE_MEAN <= estimate.high
    return hits / simulations


def test_interval_covers_the_known_mean_about_95_percent() -> None:
    assert 0.88 <= coverage(120, 500) <= 0.99


@pytest.mark.slow
def test_interval_coverage_over_400_simulations() -> None:
    assert 0.92 <= coverage(400, 2000) <= 0.98


def rejection_rate(planted: float, simulations: int) -> float:
    rejected = 0
    for i in range(simulations):
        rng = np.random.default_rng(1000 + i)
        offsets = difficulty(rng)  # both arms on the same problems
        a = simulated_scores(rng, offsets, mean=TRUE_MEAN + planted)
        b = simulated_scores(rng, offsets)
        rejected += paired_difference(a, b, resamples=500, seed=i).p_value < 0.05
    return rejected / simulations


def test_paired_test_keeps_a_null_difference_at_its_level() -> None:
    assert rejection_rate(0.0, 150) <= 0.1


def test_paired_test_rejects_a_planted_difference() -> None:
    assert rejection_rate(0.08, 40) >= 0.9


def test_paired_difference_needs_matching_cells() -> None:
    with pytest.raises(ValueError, match="same"):
        paired_difference(np.ones((3, 4)), np.ones((3, 5)))


def test_sample_sd_is_ddof_one_and_seed_interval_is_t() -> None:
    values = [0.84, 0.83, 0.85]
    assert sample_sd(values) == pytest.approx(np.std(values, ddof=1))
    estimate = seed_interval(values)
    half = 4.302652729911275 * np.std(values, ddof=1) / np.sqrt(3)  # t(0.975, 2 df)
    assert (estimate.low, estimate.high) == pytest.approx((0.84 - half, 0.84 + half))
    assert np.isnan(seed_interval([0.5]).low)


def test_holm_matches_the_step_down_definition() -> None:
    # sorted p 0.01, 0.02, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.02), max(0.04, 1 x 0.04)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_ratio_interval_pools_sums_and_treats_empty_draws_as_told() -> None:
    false = np.array([[0, 1, 0, 0], [0, 0, 0, 2]])
    found = np.array([[3, 1, 0, 0], [2, 2, 0, 2]])
    fdr = hierarchical_ratio_interval(false, found, empty=0.0)
    assert fdr.mean == pytest.approx(3 / 10)  # pooled: 3 false of 10 discoveries
    assert 0.0 <= fdr.low <= fdr.mean <= fdr.high <= 1.0
    rare = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 0, 3]])  # the only trigger tokens: one prompt
    power = hierarchical_ratio_interval(rare, rare)
    assert power.mean == 1.0 and power.low == power.high == 1.0  # empty draws are left out
    with pytest.raises(ValueError, match="must match"):
        hierarchical_ratio_interval(false, found[:1])
