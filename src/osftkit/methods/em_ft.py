"""EMFTModule: entropy minimisation on self-generated responses (an Online SFT baseline)."""

from torch import Tensor

from osftkit.methods.micro_batches import TokenBatch
from osftkit.methods.osft import OSFTModule


def entropy_loss(entropy: Tensor, weights: Tensor) -> Tensor:
    """EM-FT's loss: the weighted token entropy of the policy at tau_train."""
    return (entropy * weights).sum()


class EMFTModule(OSFTModule):
    """EM-FT (Agarwal et al. 2025; the reference's `policy_loss_type=entropy_minimization`): the
    rollouts of Online SFT (G responses at tau_sample), but the loss is the policy's token
    entropy at tau_train at the prefixes of those responses, not their NLL. No reward."""

    entropy_grad = True

    def policy_loss(self, part: TokenBatch, logp: Tensor, entropy: Tensor) -> Tensor:
        return entropy_loss(entropy, part.per_row["weights"])
