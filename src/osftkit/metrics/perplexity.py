"""Perplexity from per-token log-probs (no logits needed: they come from `token_logprobs`)."""

import torch
from torch import Tensor
from torchmetrics import MeanMetric


class TokenPerplexity(MeanMetric):
    """exp of the mean NLL over every token passed to `update` (per-token NLLs, any shape)."""

    def compute(self) -> Tensor:
        return torch.exp(super().compute())
