"""Feature tests: the Interpretability Randomization Test (IRT) and the One-Shot
Feature Test, and the counterfactual scoring and decisions they share with trigger discovery.

One hypothesis per (instance i, feature j): does f(x_i) depend on feature j beyond a draw from
P(x_j | x_-j)? Every counterfactual of every feature and draw is scored in large batches.
Hypotheses the sampler cannot redraw (a position a grammar fixes) are excluded, not tested.
"""

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from osftkit.data.null_samplers import Sampler, testable
from osftkit.interpret.fdr_control import FdrMethod, check_alpha, knockoff_reject, step_up_reject
from osftkit.interpret.statistics import (
    deviation,
    draws_for_floor_fraction,
    floor_fraction,
    irt_pvalues,
    one_shot_statistic,
    seeded_generator,
)

# The feature score f: score_fn(inputs (b, *shape), instance (b,)) -> (b,), the one scalar per
# input that a feature test questions (in interpret/, "score" means this f, not a reward or a
# token log-prob, though f may be built from them); `instance` says which of the n original
# inputs each row is a counterfactual of (for per-instance targets).
FeatureScoreFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class FeatureTestInputs:
    """What a feature test needs: inputs (n, *shape), a score function and a feature grouping.

    feature_mask has the trailing shape of the inputs and holds feature ids 0..d-1 (a column,
    patch or token position per id, as in captum's feature_mask); or, for features that may
    overlap (token spans of 1-3 positions), it is a boolean (d, *shape) tensor, one mask per
    feature. tested (n, d) marks the hypotheses that exist (default: all). truth (n, d) is
    optional ground truth; token_strings maps token ids to text for display.
    """

    inputs: Tensor
    score_fn: FeatureScoreFn
    feature_mask: Tensor
    truth: Tensor | None = None
    token_strings: Sequence[str] | None = None
    tested: Tensor | None = None

    def __post_init__(self) -> None:
        if self.feature_mask.numel() == 0 or self.inputs.shape[0] == 0:
            raise ValueError("the feature grouping is empty: no inputs or no features to test")
        shape = self.feature_mask.shape[self.overlapping :]
        if shape != self.inputs.shape[1:]:
            raise ValueError(
                f"feature_mask shape {tuple(self.feature_mask.shape)} must equal the input shape "
                f"without the batch axis, {tuple(self.inputs.shape[1:])} (or (d, *that) of bools)"
            )
        if self.overlapping and not self.feature_mask.flatten(1).any(1).all():
            raise ValueError("every feature of a boolean (d, *shape) feature_mask needs an element")
        ids = self.feature_mask.unique()
        if not self.overlapping and not torch.equal(ids.cpu(), torch.arange(ids.numel())):
            raise ValueError("feature_mask ids must be 0..d-1 with every id used")
        hypotheses = (self.inputs.shape[0], self.num_features)
        if self.tested is not None and tuple(self.tested.shape) != hypotheses:
            raise ValueError(f"tested must have shape (n, d) = {hypotheses}")

    @property
    def overlapping(self) -> bool:
        """Whether feature_mask holds one boolean mask per feature (features may overlap)."""
        return self.feature_mask.dtype == torch.bool

    @property
    def num_features(self) -> int:
        if self.overlapping:
            return self.feature_mask.shape[0]
        return int(self.feature_mask.max()) + 1

    def mask(self, j: int) -> Tensor:
        """Boolean mask (of the input's trailing shape) of feature j's elements."""
        return self.feature_mask[j] if self.overlapping else self.feature_mask == j


@dataclass
class FeatureTestResult:
    """Per (instance, feature): statistic, discovery and (IRT only) p-value; hypotheses that
    were not tested (tested False) hold NaN statistics and p-values and no discovery."""

    statistics: Tensor
    discoveries: Tensor
    pvalues: Tensor | None
    threshold: float
    model_calls: int
    tested: Tensor | None = None


def score_batched(
    score_fn: FeatureScoreFn, inputs: Tensor, instance: Tensor, batch_size: int
) -> Tensor:
    """Score inputs in chunks of batch_size, checking one finite scalar per input."""
    scores = []
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            chunk = inputs[start : start + batch_size]
            out = score_fn(chunk, instance[start : start + batch_size])
            if out.shape != (chunk.shape[0],):
                raise ValueError(
                    f"score_fn must return shape ({chunk.shape[0]},), got {tuple(out.shape)}"
                )
            if torch.isnan(out).any():
                raise ValueError("score_fn returned NaN")
            scores.append(out.detach().float().cpu())
    return torch.cat(scores)


def draw_feature(
    test: FeatureTestInputs,
    sampler: Sampler,
    j: int,
    num_draws: int,
    generator: torch.Generator,
) -> Tensor:
    """(num_draws, n, *shape) counterfactuals of feature j."""
    draws = sampler.sample(test.inputs, test.mask(j), num_draws, generator)
    if draws.shape != (num_draws, *test.inputs.shape):
        raise ValueError(f"sampler returned shape {tuple(draws.shape)} for feature {j}")
    return draws


def moved(test: FeatureTestInputs, j: int, draws: Tensor, rows: Tensor) -> bool:
    """Whether any draw changed feature j in one of `rows` (the tested instances)."""
    mask = test.mask(j)
    drawn, original = draws[:, rows.to(draws.device)][:, :, mask], test.inputs[rows][:, mask]
    return bool(rows.any()) and not torch.equal(drawn, original.expand_as(drawn))


def tested_hypotheses(test: FeatureTestInputs, sampler: Sampler) -> Tensor:
    """(n, d) hypotheses to test: those asked for (test.tested) that the sampler can redraw."""
    columns = [testable(sampler, test.inputs, test.mask(j)) for j in range(test.num_features)]
    tested = torch.stack(columns, 1)
    tested = tested if test.tested is None else tested & test.tested.bool().cpu()
    if not tested.any():
        raise ValueError("no hypothesis is testable: the sampler can redraw none of the features")
    return tested


def counterfactual_scores(
    test: FeatureTestInputs,
    sampler: Sampler,
    num_draws: int,
    batch_size: int,
    generator: torch.Generator,
) -> Tensor:
    """Scores of all counterfactuals as (num_draws, n, d).

    Features are drawn one after another and their rows pooled until a chunk holds batch_size
    rows, so the model sees full batches across features while memory stays bounded.
    """
    n, d = test.inputs.shape[0], test.num_features
    tested = tested_hypotheses(test, sampler)
    rows_per_feature = torch.arange(n, device=test.inputs.device).repeat(num_draws)
    pending: list[Tensor] = []
    scores: list[Tensor] = []
    any_moved = False
    for j in range(d):
        draws = draw_feature(test, sampler, j, num_draws, generator)
        # One draw may rightly return the original (it stays drawable); never moving any
        # feature of any tested instance means the sampler cannot test at all.
        any_moved = any_moved or moved(test, j, draws, tested[:, j])
        pending.append(draws.flatten(0, 1))
        if len(pending) * len(rows_per_feature) >= batch_size or j == d - 1:
            instance = rows_per_feature.repeat(len(pending))
            scores.append(score_batched(test.score_fn, torch.cat(pending), instance, batch_size))
            pending = []
    if not any_moved:
        raise ValueError(
            "the sampler returned the original values in every draw of every feature: it must "
            "replace them (a token sampler certain of the original token cannot test it)"
        )
    return torch.cat(scores).view(d, num_draws, n).permute(1, 2, 0)


def observed_scores(test: FeatureTestInputs, batch_size: int) -> Tensor:
    n = test.inputs.shape[0]
    return score_batched(
        test.score_fn, test.inputs, torch.arange(n, device=test.inputs.device), batch_size
    )


def one_shot_test(
    test: FeatureTestInputs,
    sampler: Sampler,
    alpha: float,
    two_sided: bool = False,
    offset: int = 1,
    batch_size: int = 4096,
    seed: int = 0,
) -> FeatureTestResult:
    """One counterfactual per hypothesis (two when two-sided), knockoff-style threshold."""
    check_alpha(alpha)
    tested = tested_hypotheses(test, sampler)
    draws = counterfactual_scores(test, sampler, 1 + two_sided, batch_size, seeded_generator(seed))
    observed = observed_scores(test, batch_size)[:, None]
    centre = draws[1] if two_sided else None
    stats = one_shot_statistic(observed, draws[0], centre)
    rejected, threshold = one_shot_decision(stats, tested, alpha, offset)
    calls = observed.numel() + draws.numel()
    return FeatureTestResult(
        stats.masked_fill(~tested, torch.nan), rejected, None, threshold, calls, tested
    )


def one_shot_decision(
    statistics: Tensor, tested: Tensor, alpha: float, offset: int
) -> tuple[Tensor, float]:
    """Knockoff(+) selection over the tested statistics: (discoveries, threshold)."""
    rejected = torch.zeros_like(tested)
    rejected[tested] = knockoff_reject(statistics[tested], alpha, offset)
    threshold = statistics[rejected].min().item() if rejected.any() else float("inf")
    return rejected, threshold


def irt_decision(
    observed: Tensor, null: Tensor, tested: Tensor, alpha: float, method: FdrMethod
) -> tuple[Tensor, Tensor, Tensor, float]:
    """IRT p-values of observed (...) against null (K, ...) statistics, then BH/BY over the
    tested hypotheses: (statistics, p-values, discoveries, largest rejected p-value); the
    statistic is the observed one minus the mean null one."""
    pvalues = irt_pvalues(observed, null).masked_fill(~tested, torch.nan)
    rejected = torch.zeros_like(tested)
    rejected[tested] = step_up_reject(pvalues[tested], alpha, method)
    threshold = pvalues[rejected].max().item() if rejected.any() else 0.0
    statistics = (observed - null.mean(0)).masked_fill(~tested, torch.nan)
    return statistics, pvalues, rejected, threshold


def sized_draws(
    num_draws: int, num_tests: int, alpha: float, method: FdrMethod, auto: bool, max_fraction: float
) -> int:
    """Warn, or raise K, when the 1/(K+1) p-value floor blocks BH/BY from rejecting."""
    if num_draws < 1:
        raise ValueError(f"num_draws (K) must be at least 1, got {num_draws}")
    fraction = floor_fraction(num_draws, num_tests, alpha, method)
    if fraction <= max_fraction:
        return num_draws
    needed = draws_for_floor_fraction(max_fraction, num_tests, alpha, method)
    if auto:
        return needed
    verdict = (
        "no rejection is possible at all"
        if fraction > 1
        else f"a rejection needs {fraction:.0%} of the {num_tests} tests at the floor"
    )
    warnings.warn(
        f"IRT with K={num_draws}: the smallest p-value is 1/(K+1)={1 / (num_draws + 1):.4g} and "
        f"{method.upper()} at alpha={alpha} over {num_tests} tests: {verdict}. "
        f"Use num_draws >= {needed} (or auto_draws=True).",
        stacklevel=3,
    )
    return num_draws


def irt(
    test: FeatureTestInputs,
    sampler: Sampler,
    alpha: float,
    num_draws: int = 100,
    two_sided: bool = False,
    method: FdrMethod = "bh",
    auto_draws: bool = False,
    max_floor_fraction: float = 0.1,
    batch_size: int = 4096,
    seed: int = 0,
) -> FeatureTestResult:
    """K counterfactuals per hypothesis, p = (1 + #{null >= observed}) / (K + 1), then BH/BY.

    When fewer than max_floor_fraction of the tests at the floor could not produce a rejection,
    K is raised (auto_draws) or a warning says which K is needed. statistics are the observed
    statistic minus the mean null statistic.
    """
    check_alpha(alpha)
    n = test.inputs.shape[0]
    tested = tested_hypotheses(test, sampler)
    num_tests = int(tested.sum())
    k = sized_draws(num_draws, num_tests, alpha, method, auto_draws, max_floor_fraction)
    draws = counterfactual_scores(test, sampler, k + two_sided, batch_size, seeded_generator(seed))
    centre = draws[k] if two_sided else None
    observed = deviation(observed_scores(test, batch_size)[:, None], centre)
    null = deviation(draws[:k], centre)
    stats, pvalues, rejected, threshold = irt_decision(observed, null, tested, alpha, method)
    calls = n + draws.numel()
    return FeatureTestResult(stats, rejected, pvalues, threshold, calls, tested)
