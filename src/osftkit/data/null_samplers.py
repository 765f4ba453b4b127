"""Counterfactual (null) samplers: redraw one feature of every instance, batched over instances
and draws. They live in the data room because a sampler states what the data are: the feature
tests (``osftkit.interpret``) and the datamodules that know their own nulls both use them.

A sampler has one method, ``sample(inputs, mask, num_draws, generator)``: ``inputs`` is
(n, *shape), ``mask`` a boolean tensor of ``shape`` marking the elements of one feature, and the
result is (num_draws, n, *shape): copies of the inputs whose masked elements are redrawn from
(an estimate of) P(x_j | x_-j). Draws come from the given CPU generator, so runs are seeded.
A sampler may also define ``testable(inputs, mask) -> (n,) bool``: the rows where the feature
can be redrawn at all (a position a grammar fixes cannot); the tests exclude the other rows.
"""

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

NullFn = Callable[[torch.Size, torch.Generator], Tensor]


class Sampler(Protocol):
    def sample(
        self, inputs: Tensor, mask: Tensor, num_draws: int, generator: torch.Generator
    ) -> Tensor: ...


def fill(inputs: Tensor, mask: Tensor, values: Tensor) -> Tensor:
    """(k, n, *shape) copies of inputs with the masked elements set to values (k, n, |mask|)."""
    out = inputs.unsqueeze(0).expand(values.shape[0], *inputs.shape).clone()
    out[:, :, mask] = values.to(device=inputs.device, dtype=inputs.dtype)
    return out


def standard_normal(shape: torch.Size, generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator)


class ExactNullSampler:
    """Draws every masked element independently from a known null, N(0, 1) by default."""

    def __init__(self, null: NullFn = standard_normal) -> None:
        self.null = null

    def sample(
        self, inputs: Tensor, mask: Tensor, num_draws: int, generator: torch.Generator
    ) -> Tensor:
        shape = torch.Size((num_draws, inputs.shape[0], int(mask.sum())))
        return fill(inputs, mask, self.null(shape, generator))


class GaussianConditionalSampler:
    """P(x_A | x_B) of a multivariate Gaussian over the flattened input (columns or pixels).

    For image patches this is a simple linear inpainting: the patch is drawn from its Gaussian
    conditional given every other pixel.
    """

    def __init__(self, mean: Tensor, cov: Tensor, jitter: float = 1e-5) -> None:
        self.mean, self.cov, self.jitter = mean.double(), cov.double(), jitter
        self._cache: dict[bytes, tuple[Tensor, Tensor, Tensor]] = {}

    @classmethod
    def fit(cls, train: Tensor, ridge: float = 1e-3) -> "GaussianConditionalSampler":
        """Fit mean and covariance on training inputs (N, *shape); ridge keeps constant pixels
        (always 0 in a digit's corner) from making the covariance singular."""
        flat = train.flatten(1).double()
        cov = torch.cov(flat.T) + ridge * torch.eye(flat.shape[1], dtype=torch.float64)
        return cls(flat.mean(0), cov)

    def _conditional(self, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Regression coefficients, Cholesky factor of the conditional covariance, flat mask."""
        flat = mask.flatten().cpu()
        key = flat.numpy().tobytes()
        if key not in self._cache:
            a, b = flat, ~flat
            coef = torch.linalg.solve(self.cov[b][:, b], self.cov[b][:, a]).T
            cond_cov = self.cov[a][:, a] - coef @ self.cov[b][:, a]
            eye = torch.eye(int(a.sum()), dtype=torch.float64)
            self._cache[key] = (coef, torch.linalg.cholesky(cond_cov + self.jitter * eye), flat)
        return self._cache[key]

    def sample(
        self, inputs: Tensor, mask: Tensor, num_draws: int, generator: torch.Generator
    ) -> Tensor:
        coef, chol, flat = self._conditional(mask)
        x = inputs.flatten(1).double().cpu()
        cond_mean = self.mean[flat] + (x[:, ~flat] - self.mean[~flat]) @ coef.T
        noise = torch.randn(
            num_draws, x.shape[0], chol.shape[0], generator=generator, dtype=torch.float64
        )
        return fill(inputs, mask, cond_mean + noise @ chol.T)


def draw_tokens(
    probs: Tensor,
    original: Tensor,
    num_draws: int,
    generator: torch.Generator,
    exclude_original: bool,
) -> Tensor:
    """(num_draws, n) token ids from probs (n, V), optionally never the row's original token."""
    probs = probs.detach().double().cpu().clone()
    if exclude_original:
        probs[torch.arange(probs.shape[0]), original.cpu()] = 0.0
    if (probs.sum(-1) <= 0).any():
        raise ValueError("the token distribution has no mass left to draw from")
    return torch.multinomial(probs, num_draws, replacement=True, generator=generator).T


def token_positions(mask: Tensor) -> list[int]:
    """The token positions a text feature covers (one, or a span of several)."""
    if mask.dim() != 1 or not mask.any():
        raise ValueError("token samplers need (L,) inputs and at least one position per feature")
    return mask.nonzero()[:, 0].tolist()


def testable(sampler: "Sampler", inputs: Tensor, mask: Tensor) -> Tensor:
    """(n,) rows where the sampler can redraw the feature: all, unless it says otherwise."""
    if hasattr(sampler, "testable"):
        return sampler.testable(inputs, mask).bool().cpu()
    return torch.ones(inputs.shape[0], dtype=torch.bool)


class CategoricalSampler:
    """Replaces each token of a feature (one position or a span) by an independent draw from a
    fixed distribution over the vocabulary: the exact null when positions are drawn
    independently, as in data=sentences. The original token stays
    drawable by default: excluding it would break the exchangeability that makes the IRT's
    p-values valid (a word whose score is the most extreme of its few alternatives would always
    sit at the p-value floor)."""

    def __init__(self, probs: Tensor, exclude_original: bool = False) -> None:
        self.probs, self.exclude_original = probs.double(), exclude_original

    def sample(
        self, inputs: Tensor, mask: Tensor, num_draws: int, generator: torch.Generator
    ) -> Tensor:
        probs = self.probs.expand(inputs.shape[0], -1)
        tokens = [
            draw_tokens(probs, inputs[:, pos], num_draws, generator, self.exclude_original)
            for pos in token_positions(mask)
        ]
        return fill(inputs, mask, torch.stack(tokens, -1))
