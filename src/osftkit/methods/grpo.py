"""GRPOModule: G rollouts, binary verifiable reward, group-normalised advantages, clipped ratio."""

from typing import Any

import torch
from torch import Tensor

from osftkit.methods.micro_batches import TokenBatch
from osftkit.methods.rollout_module import RolloutModule, token_batch
from osftkit.rollout import Rollouts


def group_advantages(rewards: Tensor, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """(prompts, G) rewards -> advantages r - mean(group) [/ std(group)]; equal groups give 0.
    Dr. GRPO is `normalize_std=False` together with loss_aggregation seq-mean-token-sum-norm
    (a constant normaliser instead of each response's length)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True, unbiased=True).nan_to_num(0.0) + eps)


class GRPOModule(RolloutModule):
    """GRPO (Shao et al. 2024). With several mini-batches per generated batch, the ratio is taken
    against the rollout-time log-probs and clipped to [1 - clip_eps, 1 + clip_eps]."""

    def __init__(
        self, *, normalize_std: bool = True, clip_eps: float = 0.2, **rollout: Any
    ) -> None:
        super().__init__(**rollout)

    @property
    def training_temperature(self) -> float:
        return self.hparams.tau_sample

    def prepare(self, rollouts: Rollouts, batch: dict) -> dict[str, Tensor]:
        rewards = self.score(rollouts, batch["answer"]).float()
        self.log("train/reward", rewards.mean(), prog_bar=True)
        extras = {"advantages": group_advantages(rewards, self.hparams.normalize_std).flatten()}
        if self.hparams.num_minibatches > 1:
            # Later mini-batches train a policy that has moved: they need the rollout log-probs.
            extras["old_logp"], _ = self.score_tokens(
                token_batch(rollouts, {}), self.training_temperature, with_entropy=False
            )
        return extras

    def policy_loss(self, part: TokenBatch, logp: Tensor) -> Tensor:
        # With one update per batch the policy is still the rollout policy: ratio 1, and the
        # gradient is the plain policy gradient, without a second forward pass.
        ratio = torch.exp(logp - part.per_row.get("old_logp", logp.detach()))
        advantage = part.per_row["advantages"][:, None]
        eps = self.hparams.clip_eps
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)
        return (-surrogate * part.per_row["weights"]).sum()
