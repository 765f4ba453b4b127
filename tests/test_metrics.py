from itertools import combinations

import pytest
import torch

from osftkit.metrics import PassAtK, pass_at_k


def brute_force_pass_at_k(outcomes: list[bool], k: int) -> float:
    """Fraction of k-subsets of the samples that contain at least one success."""
    subsets = list(combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_pass_at_k_matches_subset_enumeration(k):
    generator = torch.Generator().manual_seed(k)
    correct = torch.rand(20, 6, generator=generator) < 0.35
    metric = PassAtK([k])
    metric.update(correct[:11])
    metric.update(correct[11:])
    expected = sum(brute_force_pass_at_k(row.tolist(), k) for row in correct) / len(correct)
    assert metric.compute()[f"pass@{k}"].item() == pytest.approx(expected, abs=1e-6)


def test_avg_is_the_mean_of_the_configured_pass_at_k():
    """SePT's AVG: (pass@1 + pass@8 + pass@32) / 3, here on two problems of 32 samples."""
    correct = torch.zeros(2, 32, dtype=torch.bool)
    correct[0, :16] = True  # problem 0: 16 of 32 right; problem 1: none
    metric = PassAtK([32, 1, 8])
    metric.update(correct)
    scores = metric.compute()
    # pass@8 of problem 0: 1 - C(16, 8) / C(32, 8); problem 1 adds 0 to the mean.
    expected = {1: 0.25, 8: (1 - 12870 / 10518300) / 2, 32: 0.5}
    assert scores["pass@1"].item() == pytest.approx(expected[1])
    assert scores["pass@32"].item() == pytest.approx(expected[32])
    assert scores["avg"].item() == pytest.approx(sum(expected.values()) / 3, abs=1e-6)


def test_pass_at_k_edge_cases():
    n = torch.tensor([4, 4, 4])
    assert pass_at_k(n, torch.tensor([0, 4, 1]), 1).tolist() == pytest.approx([0.0, 1.0, 0.25])
    with pytest.raises(ValueError, match="needs at least 8 samples"):
        pass_at_k(n, torch.tensor([0, 1, 2]), 8)
    with pytest.raises(ValueError, match="positive"):
        PassAtK([0])
