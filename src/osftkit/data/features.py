"""The reference simulation of the feature-test paper as a LightningDataModule.

Each of d features of each instance is "interesting" with probability p and then drawn from
N(signal_mean, 1), otherwise from the null N(0, 1); with correlation rho the unit-variance noise
is AR(1), corr(z_i, z_j) = rho^|i-j|. The target is Y = sum_j |X_j| (or the non-differentiable
threshold model). Batches are (x, y, truth) with truth the interesting-feature mask.
"""

from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from osftkit.data.null_samplers import ExactNullSampler, GaussianConditionalSampler, Sampler
from osftkit.data.tensor_datamodule import TensorDataModule


def ar1_covariance(num_features: int, correlation: float) -> Tensor:
    idx = torch.arange(num_features)
    return correlation ** (idx[:, None] - idx[None, :]).abs().double()


def threshold_model(x: Tensor, tau: float = 2.0) -> Tensor:
    """Non-differentiable reference model: how many features exceed tau in absolute value."""
    return (x.abs() > tau).sum(-1).float()


def simulate(
    num: int,
    num_features: int,
    interesting_prob: float,
    signal_mean: float,
    correlation: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Inputs (num, d) and the ground-truth mask of interesting features."""
    truth = torch.rand(num, num_features, generator=generator) < interesting_prob
    chol = torch.linalg.cholesky(ar1_covariance(num_features, correlation)).float()
    noise = torch.randn(num, num_features, generator=generator) @ chol.T
    return noise + signal_mean * truth, truth


class KnownSignalNull:
    """The exact null of the correlated design when every instance's signals are known: feature
    j is redrawn from its AR(1) conditional given the *noise* of the other features (inputs
    minus their signal shift), with no shift of its own, as H0 says."""

    def __init__(self, cov: Tensor, shift: Tensor) -> None:
        self.noise, self.shift = GaussianConditionalSampler(torch.zeros(cov.shape[0]), cov), shift

    def sample(
        self, inputs: Tensor, mask: Tensor, num_draws: int, generator: torch.Generator
    ) -> Tensor:
        draws = self.noise.sample(inputs - self.shift, mask, num_draws, generator)
        return draws + self.shift * ~mask


class FeatureSimulationDataModule(TensorDataModule):
    def __init__(
        self,
        num_features: int = 25,
        interesting_prob: float = 0.3,
        signal_mean: float = 4.0,
        correlation: float = 0.0,
        target: Literal["sum_abs", "threshold"] = "sum_abs",
        num_train: int = 100_000,
        num_val: int = 1_000,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= correlation < 1.0:
            raise ValueError(f"correlation must lie in [0, 1), got {correlation}")
        self.save_hyperparameters()
        self.feature_mask = torch.arange(num_features)

    def make_split(self, num: int, seed: int) -> TensorDataset:
        """A seeded split of (x, y, truth); used for train/val and for fresh test sets."""
        hp = self.hparams
        x, truth = simulate(
            num,
            hp.num_features,
            hp.interesting_prob,
            hp.signal_mean,
            hp.correlation,
            torch.Generator().manual_seed(seed),
        )
        y = x.abs().sum(-1) if hp.target == "sum_abs" else threshold_model(x)
        return TensorDataset(x, y, truth)

    def feature_sampler(self) -> Sampler:
        """Independent features: the exact null N(0, 1). Correlated: the AR(1) Gaussian
        conditional given the observed neighbours, which does not know their signals (exact only
        next to null neighbours); ``known_signal_null`` is the exact one."""
        if self.hparams.correlation == 0.0:
            return ExactNullSampler()
        cov = ar1_covariance(self.hparams.num_features, self.hparams.correlation)
        return GaussianConditionalSampler(torch.zeros(self.hparams.num_features), cov)

    def known_signal_null(self, truth: Tensor) -> Sampler:
        """The exact null for instances whose interesting features (truth, (n, d)) are known."""
        cov = ar1_covariance(self.hparams.num_features, self.hparams.correlation)
        return KnownSignalNull(cov, self.hparams.signal_mean * truth.float())
