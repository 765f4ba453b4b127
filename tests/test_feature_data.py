"""The demonstration datamodules, small networks and the predictor's score function."""

import functools

import pytest
import torch

from osftkit.data.digits import DigitsDataModule, patch_mask
from osftkit.data.features import FeatureSimulationDataModule, threshold_model
from osftkit.data.sentences import MASK, NEGATIVE, POSITIVE, VOCAB, SentencesDataModule
from osftkit.interpret.feature_test import FeatureTestInputs, irt
from osftkit.interpret.predictor import PredictorModule
from osftkit.metrics.discovery_rates import fdr_tpr
from osftkit.models.small_nets import SmallCNN, TextClassifier

torch.set_num_threads(1)


def test_feature_simulation_matches_the_paper_design():
    dm = FeatureSimulationDataModule(num_train=20000, num_val=10)
    dm.setup()
    x, y, truth = dm.train_set.tensors
    assert x.shape == (20000, 25) and truth.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert x[truth].mean().item() == pytest.approx(4.0, abs=0.03)
    assert x[~truth].std().item() == pytest.approx(1.0, abs=0.02)
    assert torch.allclose(y, x.abs().sum(-1))


def test_correlated_and_threshold_variants():
    dm = FeatureSimulationDataModule(
        num_train=20000, num_val=10, correlation=0.5, target="threshold"
    )
    dm.setup()
    x, y, truth = dm.train_set.tensors
    noise = x - 4.0 * truth
    assert torch.corrcoef(noise[:, :2].T)[0, 1].item() == pytest.approx(0.5, abs=0.03)
    assert torch.equal(y, threshold_model(x))
    assert threshold_model(torch.tensor([[2.5, -3.0, 1.0]])).item() == 2.0
    with pytest.raises(ValueError, match="correlation must lie"):
        FeatureSimulationDataModule(correlation=1.0)


def test_patch_mask_and_digits():
    assert patch_mask(4, 2).tolist() == [[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]]
    with pytest.raises(ValueError, match="must divide"):
        patch_mask(8, 3)
    dm = DigitsDataModule()
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.min() >= 0.0 and x.max() <= 1.0
    assert SmallCNN()(x).shape == (64, 10)
    assert dm.feature_mask.unique().tolist() == list(range(16))


def test_sentences_labels_and_truth():
    dm = SentencesDataModule(num_train=500, num_val=10)
    dm.setup()
    ids, labels, truth = dm.train_set.tensors
    words = [[VOCAB[i] for i in row] for row in ids.tolist()]
    for row, label, marked in zip(words, labels.tolist(), truth.tolist(), strict=True):
        pos, neg = sum(w in POSITIVE for w in row), sum(w in NEGATIVE for w in row)
        assert pos != neg and label == int(pos > neg) and MASK not in row
        assert marked == [w in POSITIVE or w in NEGATIVE for w in row]
    assert TextClassifier(len(VOCAB))(ids[:4]).shape == (4, 2)


def test_classification_score_is_the_predicted_class_log_odds():
    module = PredictorModule(
        TextClassifier(len(VOCAB)), functools.partial(torch.optim.AdamW), "classification"
    )
    x = torch.randint(0, len(VOCAB) - 1, (5, 10))
    logp = module(x).log_softmax(-1)
    score = module.score_fn(x)
    instance = torch.tensor([4, 0])
    top = logp.max(-1).values[instance]
    assert torch.allclose(score(x[instance], instance), top - torch.log1p(-top.exp()), atol=1e-5)


def test_known_signal_null_controls_fdr_on_the_correlated_design():
    dm = FeatureSimulationDataModule(correlation=0.5)
    fdrs = []
    for seed in range(3):
        x, _, truth = dm.make_split(60, seed).tensors
        test = FeatureTestInputs(x, lambda inputs, _: inputs.abs().sum(-1), dm.feature_mask, truth)
        result = irt(test, dm.known_signal_null(truth), 0.1, two_sided=True, seed=seed)
        fdr, tpr = fdr_tpr(result.discoveries, truth)
        fdrs.append(fdr)
        assert tpr > 0.5
    assert sum(fdrs) / len(fdrs) <= 0.1 + 0.05
