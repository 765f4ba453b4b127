"""The Interpretability Randomization Test (IRT) and the One-Shot Feature Test.

One hypothesis per (instance i, feature j): does f(x_i) depend on feature j beyond a draw from
P(x_j | x_-j)? Every counterfactual of every feature and draw is scored in large batches.
"""

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from osftkit.interpret.fdr import FdrMethod, bh_reject, check_alpha, knockoff_reject
from osftkit.interpret.samplers import Sampler
from osftkit.interpret.statistics import (
    deviation,
    draws_for_floor_fraction,
    floor_fraction,
    irt_pvalues,
    one_shot_statistic,
    seeded_generator,
)

# score_fn(inputs (b, *shape), instance (b,)) -> (b,): one scalar per input; `instance` says which
# of the n original inputs each row is a counterfactual of (for per-instance targets).
ScoreFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class FeatureTestInputs:
    """What a feature test needs: inputs (n, *shape), a score function and a feature grouping.

    feature_mask has the trailing shape of the inputs and holds feature ids 0..d-1 (a column,
    patch or token position per id, as in captum's feature_mask). truth (n, d) is optional
    ground truth; token_strings maps token ids to text for display.
    """

    inputs: Tensor
    score_fn: ScoreFn
    feature_mask: Tensor
    truth: Tensor | None = None
    token_strings: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.feature_mask.numel() == 0 or self.inputs.shape[0] == 0:
            raise ValueError("the feature grouping is empty: no inputs or no features to test")
        if self.feature_mask.shape != self.inputs.shape[1:]:
            raise ValueError(
                f"feature_mask shape {tuple(self.feature_mask.shape)} must equal the input shape "
                f"without the batch axis, {tuple(self.inputs.shape[1:])}"
            )
        ids = self.feature_mask.unique()
        if not torch.equal(ids.cpu(), torch.arange(ids.numel())):
            raise ValueError("feature_mask ids must be 0..d-1 with every id used")

    @property
    def num_features(self) -> int:
        return int(self.feature_mask.max()) + 1


@dataclass
class FeatureTestResult:
    """Per (instance, feature): statistic, discovery and (IRT only) p-value."""

    statistics: Tensor
    discoveries: Tensor
    pvalues: Tensor | None
    threshold: float
    model_calls: int


def score_batched(score_fn: ScoreFn, inputs: Tensor, instance: Tensor, batch_size: int) -> Tensor:
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
    test: FeatureTestInputs, sampler: Sampler, j: int, num_draws: int, generator: torch.Generator
) -> Tensor:
    """(num_draws, n, *shape) counterfactuals of feature j, checked to have moved."""
    mask = test.feature_mask == j
    draws = sampler.sample(test.inputs, mask, num_draws, generator)
    if draws.shape != (num_draws, *test.inputs.shape):
        raise ValueError(f"sampler returned shape {tuple(draws.shape)} for feature {j}")
    if torch.equal(draws[:, :, mask], test.inputs[:, mask].expand_as(draws[:, :, mask])):
        raise ValueError(
            f"sampler returned the original values of feature {j} in every draw: it must replace"
            " the feature (a token sampler certain of the original token cannot test it)"
        )
    return draws


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
    rows_per_feature = torch.arange(n, device=test.inputs.device).repeat(num_draws)
    pending: list[Tensor] = []
    scores: list[Tensor] = []
    for j in range(d):
        pending.append(draw_feature(test, sampler, j, num_draws, generator).flatten(0, 1))
        if len(pending) * len(rows_per_feature) >= batch_size or j == d - 1:
            instance = rows_per_feature.repeat(len(pending))
            scores.append(score_batched(test.score_fn, torch.cat(pending), instance, batch_size))
            pending = []
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
    draws = counterfactual_scores(test, sampler, 1 + two_sided, batch_size, seeded_generator(seed))
    observed = observed_scores(test, batch_size)[:, None]
    centre = draws[1] if two_sided else None
    stats = one_shot_statistic(observed, draws[0], centre)
    rejected = knockoff_reject(stats, alpha, offset)
    threshold = stats[rejected].min().item() if rejected.any() else float("inf")
    calls = observed.numel() + draws.numel()
    return FeatureTestResult(stats, rejected, None, threshold, calls)


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
    k = sized_draws(num_draws, n * test.num_features, alpha, method, auto_draws, max_floor_fraction)
    draws = counterfactual_scores(test, sampler, k + two_sided, batch_size, seeded_generator(seed))
    centre = draws[k] if two_sided else None
    observed = deviation(observed_scores(test, batch_size)[:, None], centre)
    null = deviation(draws[:k], centre)
    pvalues = irt_pvalues(observed, null)
    rejected = bh_reject(pvalues, alpha, method)
    threshold = pvalues[rejected].max().item() if rejected.any() else 0.0
    calls = n + draws.numel()
    return FeatureTestResult(observed - null.mean(0), rejected, pvalues, threshold, calls)
