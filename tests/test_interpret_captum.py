"""Captum baselines pooled per feature, on tabular columns and on token positions."""

import pytest
import torch

from osftkit.interpret.captum_baselines import METHODS, attribute
from osftkit.interpret.feature_test import FeatureTestInputs

torch.set_num_threads(1)


def weighted_sum(inputs: torch.Tensor, instance: torch.Tensor) -> torch.Tensor:
    return inputs @ torch.tensor([3.0, 0.0, 1.0])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_ranks_the_heaviest_column_first(method):
    x = torch.ones(4, 3)
    scores = attribute(method, FeatureTestInputs(x, weighted_sum, torch.arange(3)), num_samples=50)
    assert scores.shape == (4, 3)
    assert (scores.argmax(1) == 0).all()


def test_token_features_take_perturbation_methods():
    ids = torch.tensor([[1, 3, 2, 3], [3, 0, 0, 1]])
    test = FeatureTestInputs(ids, lambda i, _: (i == 3).float().sum(-1), torch.arange(4))
    scores = attribute("feature_ablation", test, baseline=0)
    assert scores.tolist() == [[0, 1, 0, 1], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="needs float inputs"):
        attribute("integrated_gradients", test)
    with pytest.raises(ValueError, match="unknown captum method"):
        attribute("gradcam", test)


def test_overlapping_features_are_refused():
    masks = torch.tensor([[True, True], [False, True]])
    test = FeatureTestInputs(torch.zeros(2, 2), lambda x, _: x.sum(-1), masks)
    with pytest.raises(ValueError, match="feature id map"):
        attribute("feature_ablation", test)
