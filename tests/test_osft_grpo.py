"""The training signal of OSFT and GRPO, on hand-made rollouts and a one-step categorical policy."""

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from osftkit.methods import GRPOModule, OSFTModule, group_advantages
from osftkit.methods.micro_batches import TokenBatch
from osftkit.methods.rollout_module import token_batch
from osftkit.recipes import GRPORecipe, OSFTRecipe
from osftkit.rollout import Rollouts

VOCAB = 5


class CategoricalPolicy(nn.Module):
    """A 'language model' whose next-token distribution is softmax(z) at every position: its
    decoder emits a hidden state of 1 everywhere and its LM head's weights are z."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.z = nn.Parameter(torch.tensor(logits))
        self.head = Head(self.z)

    def get_decoder(self) -> nn.Module:
        return ConstantDecoder()

    def get_output_embeddings(self) -> nn.Module:
        return self.head


class ConstantDecoder(nn.Module):
    def forward(self, input_ids, **_):
        return SimpleNamespace(last_hidden_state=torch.ones(*input_ids.shape, 1))


class Head(nn.Module):
    def __init__(self, z: nn.Parameter) -> None:
        super().__init__()
        self.z = z

    def forward(self, hidden):
        return hidden * self.z


def one_token_rollouts(policy: CategoricalPolicy, tau_sample: float, n: int) -> Rollouts:
    """n responses of one token drawn from softmax(z / tau_sample), after a one-token prompt."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(policy.z.detach() / tau_sample, dim=0)
    tokens = torch.multinomial(probs, n, replacement=True, generator=generator)
    ones = torch.ones(n, 1, dtype=torch.long)
    return Rollouts(ones * 0, ones, tokens[:, None], ones, torch.zeros(n, dtype=torch.bool), 1)


def minibatch_loss(module, rollouts: Rollouts, **per_row) -> torch.Tensor:
    """The token-mean loss of the whole rollout batch as one micro-batch."""
    tokens = token_batch(rollouts, per_row)
    tokens.per_row["weights"] = tokens.per_row["token_mean"] = masked_weights(tokens)
    return module.minibatch_loss(tokens)[0]


def masked_weights(tokens: TokenBatch) -> torch.Tensor:
    mask = tokens.score_mask.float()
    return mask / mask.sum()


def osft(policy: nn.Module, tau_sample: float, tau_train: float) -> OSFTModule:
    recipe = OSFTRecipe(
        optimizer=partial(torch.optim.SGD, lr=0.1),
        group_size=1,
        tau_sample=tau_sample,
        tau_train=tau_train,
        max_new_tokens=1,
    )
    return OSFTModule(policy, None, recipe)


def osft_gradient(
    tau_sample: float, tau_train: float, n: int = 40000
) -> tuple[torch.Tensor, torch.Tensor]:
    policy = CategoricalPolicy([2.0, 1.0, 0.5, 0.0, -1.0])
    module = osft(policy, tau_sample, tau_train)
    loss = minibatch_loss(module, one_token_rollouts(policy, tau_sample, n))
    (grad,) = torch.autograd.grad(loss, policy.z)
    return policy.z.detach(), grad


def test_low_sampling_temperature_sharpens_the_mode():
    z, grad = osft_gradient(tau_sample=0.6, tau_train=1.0)
    before = torch.softmax(z, 0)
    after = torch.softmax(z - 1.0 * grad, 0)
    assert after[0] > before[0] + 0.01  # the most likely token gains
    assert after[-1] < before[-1]  # the least likely loses
    assert torch.linalg.norm(grad) > 0.05


def test_equal_temperatures_give_zero_mean_gradient():
    _, grad = osft_gradient(tau_sample=1.0, tau_train=1.0)
    _, sharpening = osft_gradient(tau_sample=0.6, tau_train=1.0)
    # Score-function identity: E[grad log p] = 0; what is left is Monte Carlo noise (~1/sqrt(n)).
    assert torch.linalg.norm(grad) < 0.02 < torch.linalg.norm(sharpening)


def test_osft_loss_uses_tau_train_not_tau_sample(tiny_lm):
    """Fails if the loss divided the logits by the sampling temperature (coupled temperatures)."""
    from tests.test_rollout import generate

    rollouts = generate(tiny_lm, ["1+2*3\n", "4*5\n"], num_samples=2, temperature=0.5)
    loss = minibatch_loss(osft(tiny_lm.model, tau_sample=0.5, tau_train=1.0), rollouts)
    logits = tiny_lm.model(rollouts.sequences, attention_mask=rollouts.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, rollouts.sequences[:, 1:, None])[..., 0]
    mask = rollouts.loss_mask.float()
    expected_at_tau_train = -(logp * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected_at_tau_train, atol=1e-4, rtol=1e-4)
    coupled = minibatch_loss(osft(tiny_lm.model, tau_sample=0.5, tau_train=0.5), rollouts)
    assert abs(coupled.item() - loss.item()) > 1e-2


@pytest.mark.parametrize(("tau_sample", "tau_train"), [(0.0, 1.0), (0.6, 0.0), (-1, 1)])
def test_temperatures_must_be_positive(tau_sample, tau_train):
    with pytest.raises(ValueError, match="must be > 0"):
        osft(CategoricalPolicy([0.0] * VOCAB), tau_sample, tau_train)


def test_group_size_must_be_positive():
    with pytest.raises(ValueError, match="G"):
        OSFTRecipe(group_size=0, tau_sample=0.6, max_new_tokens=4)


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    advantages = group_advantages(rewards)
    assert advantages[1:].abs().max() == 0  # all-equal groups carry no signal
    expected = (torch.tensor([1.0, 0, 0, 1]) - 0.5) / torch.tensor([1.0, 0, 0, 1]).std()
    torch.testing.assert_close(advantages[0], expected, atol=1e-4, rtol=1e-4)
    dr_grpo = group_advantages(rewards, normalize_std=False)
    assert dr_grpo[0].tolist() == [0.5, -0.5, -0.5, 0.5]


def test_grpo_clips_the_ratio():
    policy = CategoricalPolicy([0.0] * VOCAB)
    recipe = GRPORecipe(group_size=1, tau_sample=1.0, max_new_tokens=1, clip_eps=0.2)
    module = GRPOModule(policy, None, recipe)
    rollouts = one_token_rollouts(policy, 1.0, 4)
    logp = torch.zeros(4, 1, requires_grad=True)

    def part(**old) -> TokenBatch:
        tokens = token_batch(rollouts, {"advantages": torch.ones(4), **old})
        tokens.per_row["weights"] = masked_weights(tokens)
        return tokens

    on_policy = module.policy_loss(part(old_logp=torch.zeros(4, 1)), logp, None)
    (grad,) = torch.autograd.grad(on_policy, logp)
    assert torch.allclose(grad, torch.full_like(grad, -0.25))  # -A * d(ratio) / tokens
    without_old = module.policy_loss(part(), logp, None)  # one update per batch
    (grad,) = torch.autograd.grad(without_old, logp)
    assert torch.allclose(grad, torch.full_like(grad, -0.25))
    stale = module.policy_loss(part(old_logp=torch.full((4, 1), -1.0)), logp, None)
    (grad,) = torch.autograd.grad(stale, logp)
    assert grad.abs().max() == 0  # ratio e^1 > 1.2 with A > 0: clipped, no gradient
