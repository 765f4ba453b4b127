"""Counterfactual samplers: redraw one feature of every instance, batched over instances and draws.

A sampler has one method, ``sample(inputs, mask, num_draws, generator)``: ``inputs`` is
(n, *shape), ``mask`` a boolean tensor of ``shape`` marking the elements of one feature, and the
result is (num_draws, n, *shape): copies of the inputs whose masked elements are redrawn from
(an estimate of) P(x_j | x_-j). Draws come from the given CPU generator, so runs are seeded.
"""

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

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


def single_position(mask: Tensor) -> int:
    """Index of the one token position a text feature covers."""
    if mask.dim() != 1 or int(mask.sum()) != 1:
        raise ValueError("token samplers need (L,) inputs and one position per feature")
    return int(mask.nonzero()[0, 0])


class CategoricalSampler:
    """Replaces a token by a draw from a fixed distribution over the vocabulary: the exact null
    when positions are drawn independently, as in data=sentences. The original token stays
    drawable by default: excluding it would break the exchangeability that makes the IRT's
    p-values valid (a word whose score is the most extreme of its few alternatives would always
    sit at the p-value floor)."""

    def __init__(self, probs: Tensor, exclude_original: bool = False) -> None:
        self.probs, self.exclude_original = probs.double(), exclude_original

    def sample(
        self, inputs: Tensor, mask: Tensor, num_draws: int, generator: torch.Generator
    ) -> Tensor:
        pos = single_position(mask)
        probs = self.probs.expand(inputs.shape[0], -1)
        tokens = draw_tokens(probs, inputs[:, pos], num_draws, generator, self.exclude_original)
        return fill(inputs, mask, tokens.unsqueeze(-1))


class LMInfillSampler:
    """Proposes replacement tokens from a Hugging Face language model.

    With ``mask_token_id`` the model is a masked LM that sees both sides of the masked position;
    without it, a causal LM proposes the token from its left context (position 0 then has no
    context and cannot be tested). ``exclude_token_ids`` are never drawn. The original token
    stays drawable unless ``exclude_original``: always changing the word (as the paper's text
    experiment does) breaks the exchangeability behind the IRT's p-values. One batched LM call
    over all instances per feature.
    """

    def __init__(
        self,
        model: nn.Module,
        mask_token_id: int | None = None,
        exclude_token_ids: tuple[int, ...] = (),
        temperature: float = 1.0,
        exclude_original: bool = False,
    ) -> None:
        self.model, self.mask_token_id = model, mask_token_id
        self.exclude_original = exclude_original
        self.exclude_token_ids, self.temperature = list(exclude_token_ids), temperature

    @torch.no_grad()
    def _logits(self, inputs: Tensor, pos: int) -> Tensor:
        if self.mask_token_id is not None:
            masked = inputs.clone()
            masked[:, pos] = self.mask_token_id
            return self.model(input_ids=masked).logits[:, pos]
        if pos == 0:
            raise ValueError("a causal LM cannot infill position 0: it has no left context")
        return self.model(input_ids=inputs[:, :pos]).logits[:, -1]

    def sample(
        self, inputs: Tensor, mask: Tensor, num_draws: int, generator: torch.Generator
    ) -> Tensor:
        pos = single_position(mask)
        logits = self._logits(inputs, pos).float() / self.temperature
        logits[:, self.exclude_token_ids] = -torch.inf
        probs = logits.softmax(-1)
        tokens = draw_tokens(probs, inputs[:, pos], num_draws, generator, self.exclude_original)
        return fill(inputs, mask, tokens.unsqueeze(-1))
