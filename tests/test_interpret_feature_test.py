"""IRT and one-shot test: validity under the null, FDR control, the p-value floor, bad inputs."""

import pytest
import torch
from scipy.stats import chisquare

from osftkit.data.features import simulate
from osftkit.data.null_samplers import ExactNullSampler
from osftkit.interpret.feature_test import FeatureTestInputs, irt, one_shot_test
from osftkit.metrics.discovery_rates import fdr_tpr

torch.set_num_threads(1)


def sum_abs(inputs: torch.Tensor, instance: torch.Tensor) -> torch.Tensor:
    """The simulation's true regression function, used as a perfectly trained model."""
    return inputs.abs().sum(-1)


def simulation(n: int, seed: int, d: int = 25) -> FeatureTestInputs:
    x, truth = simulate(n, d, 0.3, 4.0, 0.0, torch.Generator().manual_seed(seed))
    return FeatureTestInputs(x, sum_abs, torch.arange(d), truth)


@pytest.mark.filterwarnings("ignore:IRT with K")
def test_irt_pvalues_uniform_under_the_null():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    test = FeatureTestInputs(x, sum_abs, torch.arange(5))
    k = 19
    result = irt(test, ExactNullSampler(), 0.1, num_draws=k, seed=1)
    levels = (result.pvalues * (k + 1)).round().long()
    counts = torch.bincount(levels.flatten(), minlength=k + 2)[1:]
    assert counts.sum() == 1000
    assert chisquare(counts.numpy()).pvalue > 1e-3  # generous: p-values take each k/(K+1) alike


@pytest.mark.parametrize("two_sided", [False, True])
def test_irt_controls_fdr_with_power(two_sided):
    fdrs, tprs = [], []
    for seed in range(4):
        result = irt(simulation(40, seed), ExactNullSampler(), 0.2, two_sided=two_sided, seed=seed)
        fdr, tpr = fdr_tpr(result.discoveries, simulation(40, seed).truth)
        fdrs.append(fdr)
        tprs.append(tpr)
    assert sum(fdrs) / len(fdrs) <= 0.2 + 0.05
    assert sum(tprs) / len(tprs) > 0.8


@pytest.mark.parametrize("two_sided", [False, True])
def test_one_shot_controls_fdr_with_power(two_sided):
    fdrs, tprs = [], []
    for seed in range(4):
        test = simulation(100, seed)
        result = one_shot_test(test, ExactNullSampler(), 0.2, two_sided=two_sided, seed=seed)
        fdr, tpr = fdr_tpr(result.discoveries, test.truth)
        fdrs.append(fdr)
        tprs.append(tpr)
        assert result.model_calls == 100 * (1 + 25 * (1 + two_sided))
    assert sum(fdrs) / len(fdrs) <= 0.2 + 0.08
    assert sum(tprs) / len(tprs) > 0.7


def test_irt_floor_warns_and_auto_sizes():
    test = simulation(20, 0, d=5)
    with pytest.warns(UserWarning, match="no rejection is possible at all"):
        result = irt(test, ExactNullSampler(), 0.01, num_draws=50)
    assert not result.discoveries.any()
    sized = irt(test, ExactNullSampler(), 0.01, num_draws=50, auto_draws=True)
    assert sized.model_calls == 20 * (1 + 5 * 999)  # K = 999: 10% of the tests at the floor suffice
    assert sized.discoveries.any()


def test_bad_alpha_and_draws():
    test = simulation(5, 0)
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
        irt(test, ExactNullSampler(), 1.0)
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
        one_shot_test(test, ExactNullSampler(), 0.0)
    with pytest.raises(ValueError, match=r"num_draws \(K\) must be at least 1"):
        irt(test, ExactNullSampler(), 0.1, num_draws=0)


def test_empty_or_malformed_grouping():
    with pytest.raises(ValueError, match="feature grouping is empty"):
        FeatureTestInputs(torch.zeros(3, 0), sum_abs, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="feature grouping is empty"):
        FeatureTestInputs(torch.zeros(0, 4), sum_abs, torch.arange(4))
    with pytest.raises(ValueError, match="must equal the input shape"):
        FeatureTestInputs(torch.zeros(3, 4), sum_abs, torch.arange(5))
    with pytest.raises(ValueError, match="ids must be 0..d-1"):
        FeatureTestInputs(torch.zeros(3, 4), sum_abs, torch.tensor([0, 1, 3, 3]))


@pytest.mark.parametrize(
    ("score_fn", "message"),
    [
        (lambda x, i: x.abs().sum(-1, keepdim=True), r"score_fn must return shape \(\d+,\)"),
        (lambda x, i: x.sum(-1) * torch.nan, "score_fn returned NaN"),
    ],
)
def test_bad_score_fn(score_fn, message):
    test = FeatureTestInputs(torch.randn(4, 3), score_fn, torch.arange(3))
    with pytest.raises(ValueError, match=message):
        one_shot_test(test, ExactNullSampler(), 0.1)


class Unchanged:
    def sample(self, inputs, mask, num_draws, generator):
        return inputs.expand(num_draws, *inputs.shape).clone()


class WrongShape:
    def sample(self, inputs, mask, num_draws, generator):
        return inputs.clone()


@pytest.mark.filterwarnings("ignore:IRT with K")
def test_bad_sampler():
    test = simulation(4, 0, d=3)
    with pytest.raises(ValueError, match="original values in every draw"):
        irt(test, Unchanged(), 0.1, num_draws=50)
    with pytest.raises(ValueError, match="sampler returned shape"):
        one_shot_test(test, WrongShape(), 0.1)


def test_per_instance_score_fn_and_patch_groups():
    # two 2-element groups; the score reads instance-specific weights via `instance`
    weights = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    x = torch.full((2, 4), 3.0)

    def weighted(inputs, instance):
        return (inputs * weights[instance]).sum(-1)

    test = FeatureTestInputs(x, weighted, torch.tensor([0, 0, 1, 1]))
    result = irt(test, ExactNullSampler(), 0.5, num_draws=99)
    assert result.discoveries.tolist() == [[True, False], [False, True]]


def test_batch_size_does_not_change_the_result():
    test = simulation(30, 3)
    big = irt(test, ExactNullSampler(), 0.2, num_draws=50, two_sided=True, seed=5)
    small = irt(test, ExactNullSampler(), 0.2, num_draws=50, two_sided=True, seed=5, batch_size=7)
    assert torch.equal(big.pvalues, small.pvalues) and torch.equal(
        big.discoveries, small.discoveries
    )


def test_overlapping_features_and_untested_hypotheses():
    """Boolean masks may overlap (spans); hypotheses with tested=False are excluded."""
    x, truth = simulate(40, 4, 0.3, 4.0, 0.0, torch.Generator().manual_seed(0))
    masks = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]).bool()
    tested = torch.ones(40, 4, dtype=torch.bool)
    tested[:, 3] = False
    test = FeatureTestInputs(x, sum_abs, masks, tested=tested)
    for result in (
        irt(test, ExactNullSampler(), 0.2, 199),
        one_shot_test(test, ExactNullSampler(), 0.2),
    ):
        assert result.statistics.shape == (40, 4) and result.tested.equal(tested)
        assert torch.isnan(result.statistics[:, 3]).all() and not result.discoveries[:, 3].any()
        assert result.discoveries[:, 1][truth[:, 0] | truth[:, 1]].float().mean() > 0.8
    with pytest.raises(ValueError, match="tested must have shape"):
        FeatureTestInputs(x, sum_abs, masks, tested=tested[:, :2])
    with pytest.raises(ValueError, match="needs an element"):
        FeatureTestInputs(x, sum_abs, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no hypothesis is testable"):
        irt(FeatureTestInputs(x, sum_abs, masks, tested=tested & False), ExactNullSampler(), 0.1)
