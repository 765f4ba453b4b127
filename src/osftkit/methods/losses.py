"""Loss aggregation modes (verl's names) as per-token weights over a whole mini-batch.

A loss is `sum(values * weights)`. The weights are computed once on the mini-batch and split with
its rows, so the micro-batches' losses add up to the mini-batch loss and their gradients to its
gradient, for every mode:

- `token-mean`: every scored token of the mini-batch weighs 1 / (its scored tokens).
- `seq-mean-token-sum`: token sums per sequence, averaged over the sequences.
- `seq-mean-token-mean`: token means per sequence, averaged over the sequences.
- `seq-mean-token-sum-norm`: token sums divided by a constant (the maximum response length),
  averaged over the sequences; with advantages not divided by the group std this is Dr. GRPO.
"""

import torch.distributed as dist
from torch import Tensor

from osftkit.recipes.rollout import AGGREGATIONS


def check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"loss_aggregation must be one of {AGGREGATIONS}, got '{aggregation}'")


def token_weights(
    mask: Tensor,
    aggregation: str,
    max_length: int | None = None,
    mean_tokens: Tensor | None = None,
) -> Tensor:
    """(N, T) weights of the masked tokens such that `sum(values * weights)` is the loss.

    `mean_tokens` (token-mean only) replaces this batch's token count by the mean count of the
    data-parallel ranks: gradients averaged over ranks are then the global batch's token mean,
    whatever the ranks' counts (`mean_tokens_over_ranks`)."""
    check_aggregation(aggregation)
    mask = mask.float()
    rows = max(mask.shape[0], 1)
    if aggregation == "token-mean":
        return mask / (mask.sum() if mean_tokens is None else mean_tokens).clamp(min=1)
    if aggregation == "seq-mean-token-sum":
        return mask / rows
    if aggregation == "seq-mean-token-mean":
        return mask / (mask.sum(dim=1, keepdim=True).clamp(min=1) * rows)
    if max_length is None or max_length < 1:
        raise ValueError("seq-mean-token-sum-norm needs the maximum response length (>= 1)")
    return mask / (max_length * rows)


def token_nll(logp: Tensor, scored: Tensor) -> Tensor:
    """The NLL every SFT-like loss is: token-mean -log p of the scored tokens."""
    return masked_mean(-logp, scored)


def masked_mean(
    values: Tensor, mask: Tensor, aggregation: str = "token-mean", max_length: int | None = None
) -> Tensor:
    """`values` aggregated over the masked tokens of one whole batch."""
    return (values * token_weights(mask, aggregation, max_length)).sum()


def mean_tokens_over_ranks(mask: Tensor) -> Tensor | None:
    """Scored tokens per data-parallel rank, averaged over the ranks (a collective: every rank
    calls it); None outside a multi-process group, where the batch's own count is right."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    count = mask.sum().float()
    dist.all_reduce(count)
    return count / dist.get_world_size()
