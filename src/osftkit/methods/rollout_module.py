"""RolloutModule: the shared loop of OSFT and GRPO (rollout hook -> mini-batch updates)."""

import copy
import logging
import math
from typing import Any

import torch
from torch import Tensor

from osftkit.methods.base import CausalLMModule
from osftkit.methods.losses import AGGREGATIONS, masked_mean, next_token_logprobs
from osftkit.rollout import Rollouts

log = logging.getLogger(__name__)


class RolloutModule(CausalLMModule):
    """Each training step: `rollout(batch)` from the current policy, `prepare` (rewards etc.),
    then `num_minibatches` optimiser steps, each on `policy_loss` of one mini-batch."""

    entropy_grad = False  # True when the loss trains on the token entropy (EM-FT)

    def __init__(
        self,
        *,
        group_size: int,
        tau_sample: float,
        max_new_tokens: int,
        top_p: float = 1.0,
        loss_aggregation: str = "token_mean",
        num_minibatches: int = 1,
        kl_coef: float = 0.0,
        **base: Any,
    ) -> None:
        if group_size < 1:
            raise ValueError(f"group_size (G) must be >= 1, got {group_size}")
        if tau_sample <= 0:
            raise ValueError(f"tau_sample must be > 0, got {tau_sample}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if loss_aggregation not in AGGREGATIONS:
            raise ValueError(
                f"loss_aggregation must be one of {AGGREGATIONS}, got '{loss_aggregation}'"
            )
        super().__init__(**base)
        self.epoch_progress = 0.0  # epochs done, fractional; drives tau_sample annealing
        # Registered, so a resumed run keeps the reference of the original start, not a copy
        # of the resumed weights. Costs one extra model in memory only when the KL is on.
        self.reference = copy.deepcopy(self.model).requires_grad_(False) if kl_coef > 0 else None
        self.register_buffer("tokens_generated", torch.zeros((), dtype=torch.long))

    @property
    def sampling_temperature(self) -> float:
        return self.hparams.tau_sample

    @property
    def training_temperature(self) -> float:
        raise NotImplementedError

    def rollout(self, batch: dict) -> Rollouts:
        """The in-loop generation hook: G responses per prompt from the CURRENT policy."""
        h = self.hparams
        rollouts = self.generate(
            batch, h.group_size, self.sampling_temperature, h.top_p, h.max_new_tokens
        )
        self.tokens_generated += int(rollouts.lengths.sum())
        if bool(rollouts.truncated.all()):
            # Still trained on (cut responses are a valid signal), but usually a sign that
            # max_new_tokens is too small or the model has lost its EOS.
            log.warning(
                "step %d: every response hit max_new_tokens=%d without EOS",
                self.global_step,
                h.max_new_tokens,
            )
        return rollouts

    def prepare(self, rollouts: Rollouts, batch: dict) -> dict[str, Tensor]:
        """Per-row tensors the loss needs besides the rollouts (rewards, advantages, ...)."""
        return {}

    def policy_loss(self, rollouts: Rollouts, logp: Tensor, extras: dict[str, Tensor]) -> Tensor:
        """The loss of one mini-batch; `extras` holds `prepare`'s rows and the token `entropy`."""
        raise NotImplementedError

    def aggregate(self, values: Tensor, mask: Tensor) -> Tensor:
        """`loss_aggregation` of token values; the constant normaliser is max_new_tokens."""
        h = self.hparams
        return masked_mean(values, mask, h.loss_aggregation, constant_normaliser=h.max_new_tokens)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        batches_per_epoch = max(self.trainer.num_training_batches, 1)
        self.epoch_progress = self.trainer.current_epoch + batch_idx / batches_per_epoch
        rollouts = self.rollout(batch)
        extras = self.prepare(rollouts, batch)
        chunks = rollouts.split(self.hparams.num_minibatches)
        start = 0
        for chunk in chunks:
            rows = slice(start, start + chunk.prompt_ids.shape[0])
            start = rows.stop
            self.update(self.minibatch_loss(chunk, {k: v[rows] for k, v in extras.items()}))
        self.log_dict(
            {
                "train/response_length": rollouts.lengths.float().mean(),
                "train/cutoff_ratio": rollouts.truncated.float().mean(),
                "train/tau_sample": self.sampling_temperature,
                "train/tokens_generated": self.tokens_generated.float(),
            }
        )

    def minibatch_loss(self, chunk: Rollouts, extras: dict[str, Tensor]) -> Tensor:
        logp, entropy = next_token_logprobs(
            self.model,
            chunk.sequences,
            chunk.attention_mask,
            self.training_temperature,
            entropy_grad=self.entropy_grad,
        )
        mask = chunk.loss_mask
        loss = self.policy_loss(chunk, logp, {**extras, "entropy": entropy})
        self.log("train/entropy", masked_mean(entropy.detach(), mask))
        if self.reference is not None:
            kl = self.kl_to_reference(chunk, logp)
            self.log("train/kl", kl)
            loss = loss + self.hparams.kl_coef * kl
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        # So that validation curves can be drawn against generation cost, not only steps.
        # Each rank counts its own rollouts: the run generated their sum.
        self.log(
            "val/tokens_generated", self.tokens_generated.float(), reduce_fx="sum", sync_dist=True
        )

    def kl_to_reference(self, chunk: Rollouts, logp: Tensor) -> Tensor:
        """k3 estimator of KL(policy || reference) on the sampled response tokens."""
        with torch.no_grad():
            ref_logp, _ = next_token_logprobs(
                self.reference, chunk.sequences, chunk.attention_mask, self.training_temperature
            )
        log_ratio = ref_logp - logp
        return self.aggregate(torch.exp(log_ratio) - log_ratio - 1, chunk.loss_mask)


def annealed(start: float, end: float, progress: float, schedule: str) -> float:
    """Value between start and end at `progress` in [0, 1] (clamped), linear or cosine."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * p
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * p))
    raise ValueError(f"anneal schedule must be 'linear' or 'cosine', got '{schedule}'")
