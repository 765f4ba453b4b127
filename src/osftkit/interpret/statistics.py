"""Test statistics of the feature tests and the p-value floor of the IRT."""

import math

import torch
from torch import Tensor

from osftkit.interpret.fdr_control import FdrMethod


def deviation(scores: Tensor, centre: Tensor | None) -> Tensor:
    """One-sided statistic: the score itself; two-sided: squared distance to a centre draw."""
    return scores if centre is None else (scores - centre) ** 2


def one_shot_statistic(observed: Tensor, counterfactual: Tensor, centre: Tensor | None) -> Tensor:
    """T = f(x) - f(x~) (one-sided) or (f(x) - c)^2 - (f(x~) - c)^2 (two-sided)."""
    return deviation(observed, centre) - deviation(counterfactual, centre)


def irt_pvalues(observed: Tensor, null: Tensor) -> Tensor:
    """p = (1 + #{null >= observed}) / (K + 1), with null stacked on a leading axis of size K."""
    num_draws = null.shape[0]
    return (1 + (null >= observed).sum(0)).double() / (num_draws + 1)


def fdr_correction(num_tests: int, method: FdrMethod) -> float:
    """BY divides alpha by the harmonic number of the test count; BH does not."""
    return sum(1.0 / i for i in range(1, num_tests + 1)) if method == "by" else 1.0


def floor_fraction(num_draws: int, num_tests: int, alpha: float, method: FdrMethod) -> float:
    """Fraction of the tests that must all sit at the floor 1/(K+1) before BH/BY can reject any.

    Derived from 1/(K+1) <= alpha * r / (m * c_m); above 1, no rejection is possible at all.
    """
    return fdr_correction(num_tests, method) / (alpha * (num_draws + 1))


def draws_for_floor_fraction(
    fraction: float, num_tests: int, alpha: float, method: FdrMethod
) -> int:
    """Smallest K whose floor lets BH/BY reject once `fraction` of the tests reach it."""
    return math.ceil(fdr_correction(num_tests, method) / (alpha * fraction)) - 1


def draws_for_rejections(rejections: int, num_tests: int, alpha: float, method: FdrMethod) -> int:
    """Smallest K whose floor lets BH/BY reject once `rejections` of the `num_tests` p-values sit
    at it: 1/(K+1) <= alpha * r / (m * c_m)."""
    if not 1 <= rejections <= num_tests:
        raise ValueError(f"rejections must lie in [1, {num_tests}], got {rejections}")
    return draws_for_floor_fraction(rejections / num_tests, num_tests, alpha, method)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator so that samplers draw the same counterfactuals on every device."""
    return torch.Generator().manual_seed(seed)
