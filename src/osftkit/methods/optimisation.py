"""One optimiser step's gradients: loss -> backward for each micro-batch of a mini-batch."""

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import Tensor

from osftkit.methods.losses import mean_tokens_over_ranks, token_weights
from osftkit.methods.micro_batches import TokenBatch

Part = TypeVar("Part")
# A micro-batch's loss and its additive contributions to the mini-batch's logged metrics.
MicroLoss = Callable[[Part], tuple[Tensor, dict[str, Tensor]]]


def backpropagate(
    micro_batches: Iterable[Part],
    micro_loss: MicroLoss,
    backward: Callable[[Tensor], None],
    step: int,
) -> dict[str, Tensor]:
    """loss -> backward for each micro-batch (their gradients add up to the mini-batch's);
    returns the summed loss and metrics. A non-finite loss stops the run before any update."""
    totals: dict[str, Tensor] = {}
    for part in micro_batches:
        loss, metrics = micro_loss(part)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Non-finite loss ({loss.item()}) at optimiser step {step}: stopping. The "
                f"weights were not updated; the last checkpoint written stays valid."
            )
        backward(loss)
        for name, value in {"loss": loss, **metrics}.items():
            totals[name] = totals.get(name, 0) + value.detach()
    return totals


def weighted(
    batch: TokenBatch, aggregation: str = "token-mean", max_length: int | None = None
) -> TokenBatch:
    """`batch` with `per_row["weights"]`, the aggregation's token weights over the whole
    mini-batch (so micro-batch losses add up to its loss), and `per_row["token_mean"]`, plain
    token-mean weights for logged per-token means (entropy)."""
    mean_tokens = mean_tokens_over_ranks(batch.score_mask) if aggregation == "token-mean" else None
    batch.per_row["weights"] = token_weights(batch.score_mask, aggregation, max_length, mean_tokens)
    batch.per_row["token_mean"] = token_weights(batch.score_mask, "token-mean")
    return batch
