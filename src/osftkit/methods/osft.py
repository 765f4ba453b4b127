"""OSFTModule: Online SFT. Sample at a low tau_sample, train with NLL at tau_train; no reward."""

from typing import Any

from torch import Tensor

from osftkit.methods.micro_batches import TokenBatch
from osftkit.methods.rollout_module import RolloutModule, annealed
from osftkit.rollout import Rollouts


class OSFTModule(RolloutModule):
    """Online SFT (Li et al. 2025). The loss divides logits by `tau_train`, never by `tau_sample`:
    with equal temperatures the expected gradient is zero and training is pure noise.

    `anneal` ({epochs, schedule}) moves tau_sample to 1 over that many epochs. `log_reward`
    scores the self-generated answers for logging only; the reward never enters the loss.
    """

    def __init__(
        self,
        *,
        tau_train: float = 1.0,
        anneal: dict[str, Any] | None = None,
        log_reward: bool = False,
        **rollout: Any,
    ) -> None:
        if tau_train <= 0:
            raise ValueError(f"tau_train must be > 0, got {tau_train}")
        super().__init__(**rollout)

    @property
    def training_temperature(self) -> float:
        return self.hparams.tau_train

    @property
    def sampling_temperature(self) -> float:
        anneal = self.hparams.anneal
        if not anneal:
            return self.hparams.tau_sample
        progress = self.epoch_progress / anneal["epochs"]
        return annealed(self.hparams.tau_sample, 1.0, progress, anneal["schedule"])

    def prepare(self, rollouts: Rollouts, batch: dict) -> dict[str, Tensor]:
        if self.hparams.log_reward:
            self.log("train/reward", self.score(rollouts, batch["answer"]).float().mean())
        return {}

    def policy_loss(self, part: TokenBatch, logp: Tensor, entropy: Tensor) -> Tensor:
        return (-logp * part.per_row["weights"]).sum()
