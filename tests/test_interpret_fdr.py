"""BH/BY and the knockoff threshold on hand-computed cases, and the FDR/TPR metrics."""

import pytest
import torch

from osftkit.interpret.fdr_control import knockoff_reject, knockoff_threshold, step_up_reject
from osftkit.metrics.discovery_rates import DiscoveryRates, best_tpr_at_fdr, fdr_tpr

torch.set_num_threads(1)


def test_bh_is_step_up():
    # thresholds k * 0.05 / 4 = .0125 .025 .0375 .05: p_(1) misses its own, but p_(3) passes
    p = torch.tensor([0.036, 0.02, 0.3, 0.024])
    assert step_up_reject(p, 0.05).tolist() == [True, True, False, True]


def test_by_divides_by_the_harmonic_number():
    # c_4 = 25/12, so thresholds are k * 0.006: two rejections for BY, three for BH
    p = torch.tensor([0.001, 0.011, 0.036, 0.3])
    assert step_up_reject(p, 0.05, "by").tolist() == [True, True, False, False]
    assert step_up_reject(p, 0.05, "bh").tolist() == [True, True, True, False]


def test_bh_keeps_the_shape():
    p = torch.tensor([[0.001, 0.9], [0.002, 0.5]])
    assert step_up_reject(p, 0.1).tolist() == [[True, False], [True, False]]


def test_knockoff_threshold_offsets():
    stats = torch.tensor([5.0, 4.0, 3.0, -1.0, 2.0, -2.5, 0.5, 6.0])
    # offset 1: z=0.5 -> 3/6, z=1 -> 3/5, z=2 -> (1+1)/5 = 0.4 passes
    assert knockoff_threshold(stats, 0.4, offset=1) == 2.0
    # offset 0: z=0.5 -> 2/6 passes
    assert knockoff_threshold(stats, 0.4, offset=0) == 0.5
    assert knockoff_reject(stats, 0.4, offset=1).sum() == 5


def test_knockoff_plus_needs_enough_positives():
    stats = torch.tensor([1.0, 2.0, 3.0])
    assert knockoff_threshold(stats, 0.2, offset=1) == float("inf")  # 1/3, 1/2, 1/1 > 0.2
    assert knockoff_threshold(stats, 0.2, offset=0) == 1.0
    assert not knockoff_reject(-stats, 0.5, offset=0).any()


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
        step_up_reject(torch.tensor([0.1]), alpha)
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
        knockoff_threshold(torch.tensor([0.1]), alpha)


def test_bad_pvalues_and_offset():
    with pytest.raises(ValueError, match="p-values must lie"):
        step_up_reject(torch.tensor([0.1, float("nan")]), 0.1)
    with pytest.raises(ValueError, match="offset must be 0 or 1"):
        knockoff_threshold(torch.tensor([1.0]), 0.1, offset=2)


def test_fdr_tpr_metrics():
    discoveries = torch.tensor([1, 1, 0, 1, 0]).bool()
    truth = torch.tensor([1, 0, 0, 1, 1]).bool()
    assert fdr_tpr(discoveries, truth) == pytest.approx((1 / 3, 2 / 3))
    assert fdr_tpr(torch.zeros(5, dtype=torch.bool), truth) == (0.0, 0.0)


def test_discovery_rates_accumulate_over_batches():
    rates = DiscoveryRates()
    rates.update(torch.tensor([True, True]), torch.tensor([True, False]))  # TP, FP
    rates.update(torch.tensor([False, True, False]), torch.tensor([True, True, False]))  # FN, TP
    result = rates.compute()
    assert (result["fdr"].item(), result["tpr"].item()) == pytest.approx((1 / 3, 2 / 3))


def test_best_tpr_at_fdr_ranks_scores():
    truth = torch.tensor([1, 0, 0, 1, 1]).bool()
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])  # top-1 has FDR 0, top-5 has FDR 0.4
    assert best_tpr_at_fdr(scores, truth, 0.1) == pytest.approx(1 / 3)
    assert best_tpr_at_fdr(scores, truth, 0.4) == pytest.approx(1.0)
