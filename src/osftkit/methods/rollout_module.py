"""RolloutModule: the shared loop of OSFT and GRPO (rollout hook -> mini-batch updates)."""

import copy
import logging
import math

import torch
from torch import Tensor

from osftkit.methods.base import CausalLMModule
from osftkit.methods.micro_batches import TokenBatch
from osftkit.methods.optimisation import weighted
from osftkit.recipes import RolloutRecipe
from osftkit.rollout import Rollouts
from osftkit.rollout.agreement import AgreementGuard, response_logprobs

log = logging.getLogger(__name__)
REFERENCE = "reference."  # the KL reference's state-dict prefix


class RolloutModule(CausalLMModule):
    """Each training step: `rollout(batch)` from the current policy, `targets` (rewards etc.),
    then `num_minibatches` optimiser steps, each on `policy_loss` of one mini-batch."""

    recipe: RolloutRecipe
    recipe_type = RolloutRecipe
    # Logged beside the validation metrics (curves against generation cost), but a training
    # counter, not a measurement of the model: the before/after table leaves it out.
    counters = frozenset({"val/tokens_generated"})

    def __init__(self, model, tokenizer, recipe: RolloutRecipe, **run) -> None:
        super().__init__(model, tokenizer, recipe, **run)
        self.epoch_progress = 0.0  # epochs done, fractional; drives tau_sample annealing
        # A frozen copy of the starting weights (one extra model, only when the KL is on). Kept
        # out of checkpoints: a resumed run rebuilds it from model.path, the same start.
        kl = recipe.kl_coef > 0
        self.reference = copy.deepcopy(self.model).requires_grad_(False) if kl else None
        if self.reference is not None:
            self.register_state_dict_post_hook(drop_reference_keys)
            self.register_load_state_dict_post_hook(allow_missing_reference)
        self.register_buffer("tokens_generated", torch.zeros((), dtype=torch.long))
        self.agreement = AgreementGuard()  # rollout/trainer log-prob agreement

    @property
    def sampling_temperature(self) -> float:
        return self.recipe.tau_sample

    @property
    def training_temperature(self) -> float:
        raise NotImplementedError

    def rollout(self, batch: dict) -> tuple[Rollouts, dict]:
        """The in-loop generation hook: G responses per prompt from the CURRENT policy, and the
        batch whose prompts they answer (GRPO's refill returns the prompts it kept)."""
        return self.sample(batch), batch

    def sample(self, batch: dict) -> Rollouts:
        """G responses per prompt of `batch` at tau_sample, counted in tokens_generated."""
        r = self.recipe
        rollouts = self.generate(
            batch, r.group_size, self.sampling_temperature, r.top_p, r.max_new_tokens
        )
        # The run's total over all ranks, so that every rank holds (and a checkpoint keeps) it.
        self.tokens_generated += self.sum_over_ranks(rollouts.lengths.sum())
        if rollouts.logprobs is not None:  # the engine reported its log-probs: compare
            scored = token_batch(rollouts, {})
            trainer, _ = self.score_tokens(scored, self.sampling_temperature, with_entropy=False)
            logp = response_logprobs(trainer, rollouts.prompt_ids.shape[1])
            mask, step = rollouts.response_mask, self.global_step
            self.log_dict(self.agreement.check(rollouts.logprobs, logp, mask, r.top_p, step))
        if bool(rollouts.truncated.all()):
            # Still trained on (cut responses are a valid signal), but usually a sign that
            # max_new_tokens is too small or the model has lost its EOS.
            log.warning(
                "step %d: every response hit max_new_tokens=%d without EOS",
                self.global_step,
                r.max_new_tokens,
            )
        return rollouts

    def targets(self, rollouts: Rollouts, batch: dict) -> dict[str, Tensor]:
        """Per-row tensors the loss needs besides the rollouts (rewards, advantages, ...)."""
        return {}

    entropy_grad = False  # True when the loss trains on the token entropy (EM-FT)

    def policy_loss(self, part: TokenBatch, logp: Tensor, entropy: Tensor) -> Tensor:
        """This micro-batch's share of the mini-batch loss (weighted by `per_row["weights"]`);
        `entropy` has a gradient only when `entropy_grad` is set."""
        raise NotImplementedError

    def minibatch_rows(self) -> int | None:
        rows = super().minibatch_rows()
        if rows is None:
            return None
        return rows * self.recipe.group_size // self.recipe.num_minibatches

    def longest_row(self) -> int | None:
        longest = super().longest_row()
        if longest is None:
            return None
        return max(longest, self.inputs.max_prompt_length + self.recipe.max_new_tokens)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        """rollout -> per-row targets -> for each mini-batch: one optimiser step (for each
        micro-batch: `minibatch_loss` -> backward; then clip, step, schedule)."""
        batches_per_epoch = max(self.trainer.num_training_batches, 1)
        self.epoch_progress = self.trainer.current_epoch + batch_idx / batches_per_epoch
        rollouts, batch = self.rollout(batch)
        tokens = token_batch(rollouts, self.targets(rollouts, batch))
        r = self.recipe
        for rows in minibatch_indices(rollouts, r.num_minibatches):
            minibatch = weighted(tokens.rows(rows), r.loss_aggregation, r.max_new_tokens)
            totals = self.gradient_step(self.micro_batches(minibatch), self.minibatch_loss)
            self.log("train/loss", totals.pop("loss"), prog_bar=True)
            self.log_dict({f"train/{name}": value for name, value in totals.items()})
        self.log_dict(
            {
                "train/response_length": rollouts.lengths.float().mean(),
                "train/cutoff_ratio": rollouts.truncated.float().mean(),
                "train/tau_sample": self.sampling_temperature,
                "train/tokens_generated": self.tokens_generated.float(),
            }
        )

    def minibatch_loss(self, part: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """MicroLoss: the policy loss (+ KL) of one micro-batch; entropy and KL for logging."""
        logp, entropy = self.logprobs(
            part, self.training_temperature, entropy_grad=self.entropy_grad
        )
        loss = self.policy_loss(part, logp, entropy)
        metrics = {"entropy": (entropy.detach() * part.per_row["token_mean"]).sum()}
        if self.reference is not None:
            metrics["kl"] = self.kl_to_reference(part, logp)
            loss = loss + self.recipe.kl_coef * metrics["kl"]
        return loss, metrics

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        # So that validation curves can be drawn against generation cost, not only steps.
        self.log("val/tokens_generated", self.tokens_generated.float(), sync_dist=False)

    def kl_to_reference(self, part: TokenBatch, logp: Tensor) -> Tensor:
        """k3 estimator of KL(policy || reference) on the sampled response tokens."""
        with torch.no_grad():
            ref_logp, _ = self.logprobs(
                part, self.training_temperature, self.reference, with_entropy=False
            )
        log_ratio = ref_logp - logp
        return ((torch.exp(log_ratio) - log_ratio - 1) * part.per_row["weights"]).sum()


def token_batch(rollouts: Rollouts, per_row: dict[str, Tensor]) -> TokenBatch:
    """The rollouts as rows to score: prompt + response, scored on the response tokens."""
    return TokenBatch(rollouts.sequences, rollouts.attention_mask, rollouts.loss_mask, per_row)


def minibatch_indices(rollouts: Rollouts, num_minibatches: int) -> list[Tensor]:
    """Row indices of each mini-batch: whole groups, in order (as `Rollouts.split` cuts them)."""
    sizes = [chunk.prompt_ids.shape[0] for chunk in rollouts.split(num_minibatches)]
    return list(torch.arange(sum(sizes), device=rollouts.prompt_ids.device).split(sizes))


def is_reference_key(key: str) -> bool:
    return key.startswith(REFERENCE) or f".{REFERENCE}" in key


def drop_reference_keys(module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + REFERENCE)]:
        del state_dict[key]


def allow_missing_reference(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not is_reference_key(key)]


def annealed(start: float, end: float, progress: float, schedule: str) -> float:
    """Value between start and end at `progress` in [0, 1] (clamped), linear or cosine."""
    p = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * p
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * p))
