"""Sampler calibration: on inputs known to be null, a valid sampler's IRT p-values are
super-uniform, P(p <= j/(K+1)) <= j/(K+1) for every j (exactly uniform on the grid when the
scores have no ties). A check any sampler must pass before its FDR is reported.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy.stats import binom
from torch import Tensor

from osftkit.data.null_samplers import Sampler
from osftkit.interpret.feature_test import (
    FeatureTestInputs,
    counterfactual_scores,
    observed_scores,
    tested_hypotheses,
)
from osftkit.interpret.statistics import irt_pvalues, seeded_generator

LEVELS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # nominal levels checked, rounded up to the grid
NUM_BINS = 20


@dataclass
class Calibration:
    """Null p-values checked for super-uniformity at the floor 1/(K+1) and a few levels.

    ``observed[l]`` is the fraction of p-values <= ``levels[l]`` (a grid point j/(K+1));
    ``level_pvalues[l]`` the one-sided binomial p-value of that many or more under uniformity;
    ``pvalue`` is their Bonferroni combination, and the sampler passes when it is at least
    ``significance``. The binomial treats the p-values as independent: give it one p-value per
    input (`one_per_instance`), since the hypotheses of one input share its score.
    """

    num_draws: int
    num_tests: int
    levels: list[float]
    observed: list[float]
    level_pvalues: list[float]
    pvalue: float
    significance: float
    histogram: Tensor
    pvalues: Tensor

    @property
    def floor(self) -> float:
        return 1.0 / (self.num_draws + 1)

    @property
    def floor_fraction(self) -> float:
        """Fraction of the null p-values at the floor 1/(K+1); a valid sampler: about floor."""
        return self.observed[0]

    @property
    def passed(self) -> bool:
        return self.pvalue >= self.significance

    def __str__(self) -> str:
        cells = ", ".join(
            f"P(p<={lv:.3g})={ob:.3f}" for lv, ob in zip(self.levels, self.observed, strict=True)
        )
        verdict = "passes" if self.passed else "FAILS"
        return (
            f"{verdict}: {self.num_tests} null tests, K={self.num_draws}, {cells}; "
            f"Bonferroni binomial p={self.pvalue:.3g} (threshold {self.significance})"
        )


def grid_levels(num_draws: int, levels: Sequence[float]) -> list[float]:
    """The floor, then each level rounded down to the p-value grid j/(K+1) (j >= 1)."""
    grid = [max(1, int(level * (num_draws + 1))) / (num_draws + 1) for level in levels]
    return sorted({1.0 / (num_draws + 1), *grid})


def one_per_instance(pvalues: Tensor, instance: Tensor, seed: int = 0) -> Tensor:
    """One p-value per instance, its hypothesis drawn uniformly (seeded, blind to the values):
    the p-values of one instance share its observed score and are dependent, those of
    different instances are independent, so the kept ones make an exact binomial check."""
    if pvalues.shape != instance.shape or pvalues.numel() == 0:
        raise ValueError("one p-value and one instance id per hypothesis, at least one")
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for i in instance.unique().tolist():
        members = (instance == i).nonzero().flatten()
        kept.append(members[torch.randint(len(members), (1,), generator=generator)])
    return pvalues[torch.cat(kept)]


def check_pvalues(
    pvalues: Tensor,
    num_draws: int,
    significance: float = 0.01,
    levels: Sequence[float] = LEVELS,
) -> Calibration:
    """Super-uniformity check of IRT p-values of null hypotheses (NaN entries: not tested)."""
    if not 0.0 < significance < 1.0:
        raise ValueError(f"calibration significance must lie in (0, 1), got {significance}")
    p = pvalues.flatten().double()
    p = p[~torch.isnan(p)]
    if p.numel() == 0:
        raise ValueError("calibration needs at least one null p-value")
    grid = grid_levels(num_draws, levels)
    eps = 1e-9  # p-values are exact grid fractions; guard the float comparison
    counts = [int((p <= level + eps).sum()) for level in grid]
    tail = [float(binom.sf(c - 1, p.numel(), level)) for c, level in zip(counts, grid, strict=True)]
    return Calibration(
        num_draws=num_draws,
        num_tests=p.numel(),
        levels=grid,
        observed=[c / p.numel() for c in counts],
        level_pvalues=tail,
        pvalue=min(1.0, min(tail) * len(grid)),
        significance=significance,
        histogram=torch.histc(p.float(), bins=NUM_BINS, min=0.0, max=1.0),
        pvalues=p,
    )


def calibrate(
    test: FeatureTestInputs,
    sampler: Sampler,
    num_draws: int = 100,
    significance: float = 0.01,
    batch_size: int = 4096,
    seed: int = 0,
) -> Calibration:
    """Run the one-sided IRT on inputs known to be null (every feature unimportant, e.g. clean
    prompts) and check that its p-values are super-uniform."""
    tested = tested_hypotheses(test, sampler)
    null = counterfactual_scores(test, sampler, num_draws, batch_size, seeded_generator(seed))
    observed = observed_scores(test, batch_size)[:, None]
    pvalues = irt_pvalues(observed, null).masked_fill(~tested, torch.nan)
    return check_pvalues(pvalues, num_draws, significance)
