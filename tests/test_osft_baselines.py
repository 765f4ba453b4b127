"""The paper's baselines and ablations: EM-FT, the offline variant, Dr. GRPO and DAPO, on
hand-made rollouts and a one-step categorical policy; the offline set across resume."""

from functools import partial

import pytest
import torch

from osftkit.methods import EMFTModule, GRPOModule, OfflineOSFTModule, OSFTModule
from osftkit.methods.grpo import concat_rollouts, overlong_penalty
from osftkit.methods.losses import masked_mean, token_weights
from osftkit.methods.micro_batches import TokenBatch
from osftkit.methods.rollout_module import token_batch
from osftkit.recipes import OverlongBuffer
from osftkit.rollout import Rollouts
from osftkit.train import run
from tests.conftest import FAST
from tests.test_osft_grpo import VOCAB, CategoricalPolicy, one_token_rollouts

CORRECT = 0  # the categorical policy's mode is the right answer, as in the arithmetic base
PAD_ZERO = type("Tokenizer", (), {"pad_token_id": 0})()  # what concatenating rollouts reads


def module(cls: type, policy: torch.nn.Module, **knobs) -> torch.nn.Module:
    settings = {"group_size": 1, "tau_sample": 1.0, "max_new_tokens": 1, **knobs}
    optimizer = partial(torch.optim.SGD, lr=0.1)
    return cls(policy, None, cls.recipe_type(optimizer=optimizer, **settings))


def weighted(arm_module, rollouts: Rollouts, **per_row: torch.Tensor) -> TokenBatch:
    """The rollouts as one micro-batch holding the whole mini-batch, with the module's loss
    weights (its aggregation over the batch) and token-mean weights (logged entropy)."""
    tokens = token_batch(rollouts, per_row)
    h = arm_module.recipe
    mask = tokens.score_mask
    tokens.per_row["weights"] = token_weights(mask, h.loss_aggregation, h.max_new_tokens)
    tokens.per_row["token_mean"] = token_weights(mask, "token-mean")
    return tokens


def arm_loss(arm_module, rollouts: Rollouts, per_row: dict) -> torch.Tensor:
    """The module's loss on the whole rollout batch as one micro-batch."""
    return arm_module.minibatch_loss(weighted(arm_module, rollouts, **per_row))[0]


def entropy(z: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Categorical(logits=z).entropy()


# ---- loss aggregation -----------------------------------------------------------------------
def test_seq_mean_token_sum_norm_divides_by_the_constant_not_the_length():
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    # Token sums 4 and 4, each / 8, mean over sequences: the short row weighs as much per token.
    assert masked_mean(values, mask, "seq-mean-token-sum-norm", max_length=8) == 0.5
    assert masked_mean(values, mask, "token-mean") == pytest.approx(8 / 6)
    assert masked_mean(values, mask, "seq-mean-token-mean") == pytest.approx(1.5)
    with pytest.raises(ValueError, match="maximum response length"):
        masked_mean(values, mask, "seq-mean-token-sum-norm")


def test_dr_grpo_gradient_uses_max_new_tokens_as_the_normaliser():
    policy = CategoricalPolicy([0.0] * VOCAB)
    dr_grpo = module(
        GRPOModule,
        policy,
        max_new_tokens=4,
        normalize_std=False,
        loss_aggregation="seq-mean-token-sum-norm",
    )
    rollouts = one_token_rollouts(policy, 1.0, 4)  # one response token each
    logp = torch.zeros(4, 1, requires_grad=True)
    loss = dr_grpo.policy_loss(weighted(dr_grpo, rollouts, advantages=torch.ones(4)), logp, None)
    (grad,) = torch.autograd.grad(loss, logp)
    # -A / (max_new_tokens * sequences) = -1 / 16, not token-mean's -1 / 4.
    assert torch.allclose(grad, torch.full_like(grad, -1 / 16))


# ---- EM-FT ----------------------------------------------------------------------------------
def test_em_ft_loss_is_the_entropy_and_its_gradient_sharpens():
    policy = CategoricalPolicy([2.0, 1.0, 0.5, 0.0, -1.0])
    em_ft = module(EMFTModule, policy, tau_sample=0.6, tau_train=1.0)
    loss = arm_loss(em_ft, one_token_rollouts(policy, 0.6, 64), {})
    z = policy.z.detach()
    torch.testing.assert_close(loss, entropy(z))  # every position has softmax(z)
    (grad,) = torch.autograd.grad(loss, policy.z)
    leaf = z.clone().requires_grad_()
    (expected,) = torch.autograd.grad(entropy(leaf), leaf)
    torch.testing.assert_close(grad, expected)
    stepped = z - 1.0 * grad
    assert entropy(stepped) < entropy(z)
    assert torch.softmax(stepped, 0)[0] > torch.softmax(z, 0)[0]  # the mode gains
    assert grad[0] < 0 < grad[-1]  # descent raises the top logit, lowers the bottom one


def test_only_em_ft_trains_on_the_entropy():
    policy = CategoricalPolicy([2.0, 1.0, 0.5, 0.0, -1.0])
    rollouts = one_token_rollouts(policy, 0.6, 8)
    osft = module(OSFTModule, policy, tau_sample=0.6)
    captured = {}
    osft.policy_loss = lambda part, logp, entropy: captured.update(entropy=entropy) or logp.sum()
    arm_loss(osft, rollouts, {})
    assert not captured["entropy"].requires_grad  # detached unless the loss needs it


# ---- DAPO -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("log_ratio", "advantage", "clipped"),
    [
        (0.22, 1.0, False),  # ratio 1.246: inside clip-higher's 1.28, outside symmetric 1.2
        (0.27, 1.0, True),  # ratio 1.31 > 1.28
        (-0.17, -1.0, False),  # ratio 0.84 > 0.8
        (-0.25, -1.0, True),  # ratio 0.78 < 0.8: the low bound stays 0.2
    ],
)
def test_dapo_clip_bounds(log_ratio, advantage, clipped):
    policy = CategoricalPolicy([0.0] * VOCAB)
    dapo = module(GRPOModule, policy, clip_eps=0.2, clip_eps_high=0.28)
    symmetric = module(GRPOModule, policy, clip_eps=0.2)
    rollouts = one_token_rollouts(policy, 1.0, 2)
    logp = torch.full((2, 1), log_ratio, requires_grad=True)
    extras = {"advantages": torch.full((2,), advantage), "old_logp": torch.zeros(2, 1)}
    part = weighted(dapo, rollouts, **extras)
    (grad,) = torch.autograd.grad(dapo.policy_loss(part, logp, None), logp)
    assert (grad.abs().max() == 0) == clipped
    (grad,) = torch.autograd.grad(symmetric.policy_loss(part, logp, None), logp)
    assert (grad.abs().max() == 0) == (clipped or abs(log_ratio) > 0.19)


def test_overlong_penalty_is_linear_over_the_buffer():
    buffer = OverlongBuffer(length=4, penalty_factor=0.5)
    penalty = overlong_penalty(buffer, torch.tensor([5, 6, 8, 10]), 10)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.25, -0.5]))


def rollouts_of(responses: list[list[int]], group_size: int, prompt_width: int = 2) -> Rollouts:
    """Hand-made rollouts: prompts of `prompt_width` tokens, responses right-padded with 0."""
    n, width = len(responses), max(len(r) for r in responses)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in responses])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses])
    prompts = torch.ones(n, prompt_width, dtype=torch.long)
    return Rollouts(
        prompts, prompts.clone(), ids, mask, torch.zeros(n, dtype=torch.bool), group_size
    )


def dynamic_grpo(generations: list[Rollouts], rewards: list[list[list[int]]], refills: list[dict]):
    """A DAPO module whose generations, verifier and refill prompts are scripted."""
    dapo = module(
        GRPOModule,
        CategoricalPolicy([0.0] * VOCAB),
        group_size=2,
        max_new_tokens=4,
        dynamic_sampling={"max_generation_batches": 3},
    )
    dapo.tokenizer = PAD_ZERO
    by_answers = {}
    outputs = iter(generations)
    dapo.generate = lambda batch, *args: outputs.__next__()
    dapo.score = lambda rollouts, answers: torch.tensor(by_answers[tuple(answers)])
    dapo.next_refill_batch = iter(refills).__next__
    for batch, reward in zip([None, *refills], rewards, strict=False):
        if batch is not None:
            by_answers[tuple(batch["answer"])] = reward
    return dapo, by_answers


def test_dynamic_sampling_drops_equal_groups_and_refills_the_batch():
    first = rollouts_of([[5], [6], [7], [8]], group_size=2)
    second = rollouts_of([[1, 1, 1], [2, 2], [3], [4, 4, 4]], group_size=2)
    refill = {"answer": ["c", "d"], "problem": ["C", "D"]}
    dapo, by_answers = dynamic_grpo([first, second], [[], [[0, 0], [0, 1]]], [refill])
    by_answers[("a", "b")] = [[1, 1], [1, 0]]  # prompt a: all right, dropped; b kept
    batch = {"answer": ["a", "b"], "problem": ["A", "B"]}
    kept, kept_batch = dapo.rollout(batch)
    assert kept_batch["answer"] == ["b", "d"]  # the kept prompts, in order
    assert batch["answer"] == ["a", "b"]  # the caller's batch is not changed
    assert kept.response_ids.tolist() == [[7, 0, 0], [8, 0, 0], [3, 0, 0], [4, 4, 4]]
    assert kept.lengths.tolist() == [1, 1, 1, 3]
    assert int(dapo.tokens_generated) == 4 + 9  # dropped groups were generated too


def test_dynamic_sampling_gives_up_after_max_generation_batches():
    same = [rollouts_of([[5], [6]], group_size=2) for _ in range(3)]
    refills = [{"answer": [f"r{i}"], "problem": ["R"]} for i in range(2)]
    dapo, by_answers = dynamic_grpo(same, [[], [[1, 1]], [[0, 0]]], refills)
    by_answers[("a",)] = [[1, 1]]
    batch = {"answer": ["a"], "problem": ["A"]}
    kept, kept_batch = dapo.rollout(batch)
    assert kept_batch["answer"] == ["a"] and kept is same[0]  # a zero-advantage step on the batch
    assert int(dapo.tokens_generated) == 6


def test_concatenated_rollouts_pad_prompts_left_and_responses_right():
    a, b = rollouts_of([[1], [2]], 1, prompt_width=1), rollouts_of([[3, 3]], 1, prompt_width=3)
    joined = concat_rollouts([a, b], pad_token_id=9)
    assert joined.prompt_ids.tolist() == [[9, 9, 1], [9, 9, 1], [1, 1, 1]]
    assert joined.prompt_mask.tolist() == [[0, 0, 1], [0, 0, 1], [1, 1, 1]]
    assert joined.response_ids.tolist() == [[1, 9], [2, 9], [3, 3]]


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"clip_eps_high": 0.0}, "clip_eps"),
        ({"dynamic_sampling": {"max_generation_batches": 0}}, "max_generation_batches"),
        ({"dynamic_sampling": {"batches": 2}}, "dynamic_sampling"),
        ({"dynamic_sampling": {}, "group_size": 1}, "group_size >= 2"),
        ({"overlong_buffer": {"length": 9}}, "overlong_buffer.length"),
        ({"overlong_buffer": {"penalty_factor": -1.0, "length": 2}}, "penalty_factor"),
    ],
)
def test_bad_grpo_knobs_fail_at_construction(knobs, match):
    with pytest.raises(ValueError, match=match):
        module(GRPOModule, CategoricalPolicy([0.0] * VOCAB), **{"max_new_tokens": 8, **knobs})


def test_offline_rejects_annealing():
    with pytest.raises(ValueError, match="anneal"):
        module(OfflineOSFTModule, CategoricalPolicy([0.0] * VOCAB), anneal={"epochs": 1})


# ---- short seeded runs on a one-step policy whose mode is the right answer -----------------
def sample_groups(policy: CategoricalPolicy, tau: float, prompts: int, group: int) -> Rollouts:
    probs = torch.softmax(policy.z.detach() / tau, dim=0)
    tokens = torch.multinomial(probs, prompts * group, replacement=True)
    ones = torch.ones(prompts * group, 1, dtype=torch.long)
    return Rollouts(ones * 0, ones, tokens[:, None], ones, torch.zeros_like(tokens).bool(), group)


ARMS = {  # name -> (module class, knobs); every arm trains 40 SGD steps on 64 prompts
    "osft": (OSFTModule, {"tau_sample": 0.6}),
    "coupled": (OSFTModule, {"tau_sample": 1.0}),
    "offline": (OSFTModule, {"tau_sample": 0.6}),
    "em_ft": (EMFTModule, {"tau_sample": 0.6}),
    "grpo": (GRPOModule, {"group_size": 8}),
    "dr_grpo": (
        GRPOModule,
        {"group_size": 8, "normalize_std": False, "loss_aggregation": "seq-mean-token-sum-norm"},
    ),
    "dapo": (
        GRPOModule,
        {
            "group_size": 8,
            "clip_eps_high": 0.28,
            "loss_aggregation": "token-mean",
            "dynamic_sampling": {"max_generation_batches": 10},
        },
    ),
}


def pass1_after_training(arm: str, steps: int = 40, prompts: int = 64) -> tuple[float, float]:
    """P(right answer) at temperature 1 before and after `steps` updates of the arm's loss."""
    torch.manual_seed(0)
    cls, knobs = ARMS[arm]
    policy = CategoricalPolicy([1.0, 0.5, 0.0, -0.5, -1.0])
    arm_module = module(cls, policy, **knobs)
    arm_module.generate = lambda batch, group, tau, *_: sample_groups(
        policy, tau, len(batch["answer"]), group
    )
    arm_module.score = lambda rollouts, answers: (rollouts.response_ids == CORRECT).view(
        -1, rollouts.group_size
    )
    batch = {"answer": ["0"] * prompts, "problem": ["p"] * prompts}
    arm_module.next_refill_batch = lambda: dict(batch)
    arm_module.tokenizer = PAD_ZERO
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    before = torch.softmax(policy.z.detach(), 0)[CORRECT].item()
    frozen = arm_module.rollout(dict(batch)) if arm == "offline" else None
    for _ in range(steps):
        rollouts, step_batch = frozen if frozen is not None else arm_module.rollout(dict(batch))
        loss = arm_loss(arm_module, rollouts, arm_module.targets(rollouts, step_batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, torch.softmax(policy.z.detach(), 0)[CORRECT].item()


@pytest.mark.parametrize("arm", ["osft", "offline", "em_ft", "grpo", "dr_grpo", "dapo"])
def test_each_arm_raises_pass_at_1(arm):
    before, after = pass1_after_training(arm)
    assert after > before + 0.05, (arm, before, after)


def test_coupled_temperatures_do_not_raise_pass_at_1():
    # Many prompts per step, so that the coupled arm's zero-mean noise stays small.
    before, after = pass1_after_training("coupled", prompts=1024)
    _, sharpened = pass1_after_training("osft", prompts=1024)
    assert after < before + 0.02 < sharpened, (before, after, sharpened)


# ---- the offline set on a real run ---------------------------------------------------------
def test_offline_set_is_generated_once_and_reused_across_resume(fast_cfg, tmp_path, monkeypatch):
    calls = []
    generate = OfflineOSFTModule.generate

    def recording(self, batch, num_samples, temperature, *args):
        calls.append((self.global_step, temperature))
        return generate(self, batch, num_samples, temperature, *args)

    monkeypatch.setattr(OfflineOSFTModule, "generate", recording)
    # 16 prompts, 8 per step: the 3 steps cover the set twice over.
    overrides = ["method=osft_offline", "data.train.size=16", "logger=none"]
    run(fast_cfg(*overrides))
    sampled = [step for step, tau in calls if tau == 0.6]
    assert sampled == [0, 0]  # two batches of new prompts, before the first step only
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    frozen = saved["offline_set"]
    assert 1 <= len(frozen["problems"]) <= 16 and len(frozen["lengths"]) == len(frozen["problems"])
    assert len(frozen["response_tokens"]) == int(frozen["lengths"].sum())
    assert int(saved["state_dict"]["tokens_generated"]) == int(frozen["lengths"].sum())

    calls.clear()
    run(fast_cfg(*overrides, f"ckpt_path={last}", "trainer.max_steps=5"))
    assert [tau for _, tau in calls if tau == 0.6] == []  # the resumed run reuses the set
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 5 and resumed["offline_set"]["problems"] == frozen["problems"]
    for key in ("response_tokens", "lengths", "truncated"):
        assert torch.equal(resumed["offline_set"][key], frozen[key])


# ---- a first run that builds its base equals one that finds it ------------------------------
def test_building_the_base_does_not_change_the_run(fast_cfg, tmp_path):
    build = [o for o in FAST if not o.startswith("model=")]
    build += ["experiment=arith_base", "logger=none", "trainer.max_steps=2"]
    quoted = ",".join(f"'{override}'" for override in build)
    overrides = ["model=arith_base", f"model.build_with=[{quoted}]", "method=osft", "logger=none"]
    built = run(fast_cfg(*overrides))
    assert (tmp_path / "models" / "arith_base" / "config.json").exists()
    cfg = fast_cfg(*overrides)
    cfg.paths.output_dir = str(tmp_path / "second")
    found = run(cfg)
    assert found == built  # entropy and lengths depend on every random draw
