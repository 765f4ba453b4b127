"""The optimiser step: loss -> backward for each micro-batch of a mini-batch, then clip, step and
schedule; one for every method."""

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import Tensor
from transformers import get_scheduler

from osftkit.hardware import FSDP2Strategy, average_gradients_outside_fsdp, check_master_weights
from osftkit.methods.losses import mean_tokens_over_ranks, token_weights
from osftkit.methods.micro_batches import MicroBatching, TokenBatch
from osftkit.recipes import LMRecipe

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


class Optimisation:
    """CausalLMModule's optimiser: AdamW-style factory + LR schedule, and `gradient_step`, the
    one micro-batched optimiser step that every method's training_step takes."""

    recipe: LMRecipe
    micro_batching: MicroBatching
    optimizer_factory: Callable

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        check_master_weights(trainable)
        optimizer = self.optimizer_factory(params=trainable)
        settings = self.recipe.scheduler
        scheduler = get_scheduler(
            settings.name if settings else "constant",
            optimizer,
            num_warmup_steps=settings.num_warmup_steps if settings else None,
            num_training_steps=self.training_steps(),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def training_steps(self) -> int:
        """Optimiser steps of the run, for the LR schedule: trainer.max_steps, or with
        max_steps -1 as many as the data gives (Lightning's estimate: epochs x batches)."""
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise ValueError(
                "The LR schedule needs the run's length: set trainer.max_steps, or "
                "trainer.max_epochs with trainer.max_steps=-1"
            )
        return int(steps)

    def gradient_step(self, micro_batches: Iterable[Part], micro_loss: MicroLoss) -> dict:
        """One optimiser step, every method's: (zero grad) for each micro-batch loss -> backward;
        then clip, step and schedule. Returns the mini-batch's summed loss and metrics."""
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        totals = backpropagate(micro_batches, micro_loss, self.manual_backward, self.global_step)
        self.average_unsharded_gradients()
        if self.recipe.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # no gradients held through the next rollout
        self.lr_schedulers().step()
        return totals

    def micro_batches(self, minibatch: TokenBatch) -> list[TokenBatch]:
        """The mini-batch cut into micro-batches, each trimmed to its own longest row."""
        return [part for _, part in self.micro_batching.split(minibatch)]

    def sum_over_ranks(self, value: Tensor) -> Tensor:
        """`value` summed over the data-parallel ranks (a collective; as is outside a Trainer)."""
        return self.all_gather(value).sum(dim=0) if self._trainer is not None else value

    def on_every_rank(self, decision: bool) -> bool:
        """Whether `decision` holds on every rank (a collective; as is outside a Trainer)."""
        if self._trainer is None:
            return decision
        return self.trainer.strategy.reduce_boolean_decision(decision, all=True)

    def average_unsharded_gradients(self) -> None:
        """FSDP2 averages the gradients of the modules it shards; a tensor trained beside them
        (SANDE's parrot) is averaged over the ranks here. (DDP wraps the whole module.)"""
        if isinstance(self.trainer.strategy, FSDP2Strategy) and self.trainer.world_size > 1:
            average_gradients_outside_fsdp(self.parameters())
