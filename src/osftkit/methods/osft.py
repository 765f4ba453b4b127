"""OSFTModule: Online SFT. Sample at a low tau_sample, train with NLL at tau_train; no reward."""

from torch import Tensor

from osftkit.methods.micro_batches import TokenBatch
from osftkit.methods.rollout_module import RolloutModule, annealed
from osftkit.recipes import OSFTRecipe
from osftkit.rollout import Rollouts


def osft_loss(logp: Tensor, weights: Tensor) -> Tensor:
    """Online SFT's loss: the weighted NLL of the self-generated tokens, log p at tau_train."""
    return (-logp * weights).sum()


class OSFTModule(RolloutModule):
    """Online SFT (Li et al. 2025). The loss divides logits by `tau_train`, never by `tau_sample`:
    with equal temperatures the expected gradient is zero and training is pure noise.

    `anneal` moves tau_sample to 1 over that many epochs. `log_reward` scores the
    self-generated answers for logging only; the reward never enters the loss.
    """

    recipe: OSFTRecipe
    recipe_type = OSFTRecipe

    @property
    def training_temperature(self) -> float:
        return self.recipe.tau_train

    @property
    def sampling_temperature(self) -> float:
        anneal = self.recipe.anneal
        if anneal is None:
            return self.recipe.tau_sample
        progress = self.epoch_progress / anneal.epochs
        return annealed(self.recipe.tau_sample, 1.0, progress, anneal.schedule)

    def targets(self, rollouts: Rollouts, batch: dict) -> dict[str, Tensor]:
        if self.recipe.log_reward:
            self.log("train/reward", self.score(rollouts, batch["answer"]).float().mean())
        return {}

    def policy_loss(self, part: TokenBatch, logp: Tensor, entropy: Tensor) -> Tensor:
        return osft_loss(logp, part.per_row["weights"])
