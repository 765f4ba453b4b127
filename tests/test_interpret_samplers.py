"""Samplers: the Gaussian conditional against the analytic answer, token samplers (one position
and spans), the masked-LM infill sampler (built and saved in tmp_path, loaded back)."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from osftkit.data.null_samplers import (
    CategoricalSampler,
    ExactNullSampler,
    GaussianConditionalSampler,
)
from osftkit.interpret.feature_test import FeatureTestInputs, one_shot_test
from osftkit.interpret.lm_feature_score import target_logprob
from osftkit.interpret.samplers import LMInfillSampler, train_masked_lm

torch.set_num_threads(1)
VOCAB_SIZE, LENGTH = 20, 6


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_exact_null_replaces_only_the_masked_elements():
    x = torch.zeros(3, 4)
    mask = torch.tensor([False, True, True, False])
    draws = ExactNullSampler().sample(x, mask, 5, gen())
    assert draws.shape == (5, 3, 4)
    assert (draws[:, :, ~mask] == 0).all() and (draws[:, :, mask] != 0).all()


def test_gaussian_conditional_matches_the_bivariate_formula():
    rho = 0.8
    cov = torch.tensor([[1.0, rho], [rho, 1.0]])
    train = torch.randn(20000, 2, generator=gen()) @ torch.linalg.cholesky(cov).T
    sampler = GaussianConditionalSampler.fit(train)
    x = torch.tensor([[0.0, 2.0]])
    draws = sampler.sample(x, torch.tensor([True, False]), 4000, gen(1))[:, 0, 0]
    # x1 | x2 ~ N(rho * x2, 1 - rho^2)
    assert draws.mean().item() == pytest.approx(rho * 2.0, abs=0.05)
    assert draws.var().item() == pytest.approx(1 - rho**2, abs=0.04)


def test_gaussian_conditional_inpaints_image_patches():
    images = torch.rand(200, 1, 4, 4, generator=gen())
    images[:, :, 0, 0] = 0.0  # a constant pixel, as in the digits' corners
    sampler = GaussianConditionalSampler.fit(images)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[:, :2, :2] = True
    draws = sampler.sample(images[:3], mask, 2, gen())
    assert draws.shape == (2, 3, 1, 4, 4)
    assert torch.equal(draws[:, :, ~mask], images[:3, ~mask].expand(2, 3, -1))
    assert not torch.equal(draws[:, :, mask], images[:3, mask].expand(2, 3, -1))


def test_categorical_sampler_draws_from_probs():
    x = torch.randint(0, VOCAB_SIZE, (50, LENGTH), generator=gen())
    mask = torch.arange(LENGTH) == 2
    probs = torch.zeros(VOCAB_SIZE)
    probs[:4] = 1.0
    draws = CategoricalSampler(probs).sample(x, mask, 400, gen())
    assert torch.equal(draws[:, :, ~mask], x[:, ~mask].expand(400, -1, -1))
    assert torch.bincount(draws[:, :, 2].flatten(), minlength=VOCAB_SIZE)[4:].sum() == 0
    assert (draws[:, :, 2] == x[:, 2]).any()  # the original stays drawable: an exchangeable null
    excluding = CategoricalSampler(probs, exclude_original=True).sample(x, mask, 400, gen())
    assert (excluding[:, :, 2] != x[:, 2]).all()
    span = CategoricalSampler(probs).sample(x, torch.arange(LENGTH) < 2, 400, gen())
    assert (span[:, :, :2] < 4).all() and (span[:, :, 0] != span[:, :, 1]).any()
    with pytest.raises(ValueError, match="at least one position"):
        CategoricalSampler(probs).sample(x, torch.zeros(LENGTH, dtype=torch.bool), 1, gen())


def tiny_bert() -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
    )
    return BertForMaskedLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_embd=16, n_layer=1, n_head=2, n_positions=LENGTH)
    return GPT2LMHeadModel(config).eval()


def test_lm_infill_sampler(tmp_path):
    tiny_bert().save_pretrained(tmp_path / "mlm")
    sampler = LMInfillSampler.from_pretrained(
        tmp_path / "mlm",
        mask_token_id=VOCAB_SIZE - 1,
        exclude_token_ids=(0, VOCAB_SIZE - 1),
        exclude_original=True,
    )
    x = torch.randint(1, VOCAB_SIZE - 1, (8, LENGTH), generator=gen())
    for mask in (
        torch.arange(LENGTH) == 3,
        (torch.arange(LENGTH) >= 2) & (torch.arange(LENGTH) < 5),
    ):
        draws = sampler.sample(x, mask, 40, gen())
        assert draws.shape == (40, 8, LENGTH)
        new = draws[:, :, mask]
        assert (new != x[:, mask]).all() and (new != 0).all() and (new != VOCAB_SIZE - 1).all()
        assert torch.equal(draws[:, :, ~mask], x[:, ~mask].expand(40, -1, -1))
        assert torch.equal(draws, sampler.sample(x, mask, 40, gen()))  # seeded
    with pytest.raises(ValueError, match="names no mask token"):
        LMInfillSampler.from_pretrained(tmp_path / "mlm")


def test_masked_lm_trained_on_clean_data_learns_the_slot_distribution():
    """Sequences 'a x b' with x uniform over {3, 4}: the infill puts its mass on {3, 4}."""
    rows = [[1, 3 + (i % 2), 2] for i in range(64)]
    mask_id, pad_id = VOCAB_SIZE - 1, 0
    lm = train_masked_lm(rows, VOCAB_SIZE, mask_id, pad_id, steps=150, hidden_size=16)
    sampler = LMInfillSampler(lm, mask_id)
    draws = sampler.sample(
        torch.tensor([[1, 3, 2]]), torch.tensor([False, True, False]), 200, gen()
    )
    assert ((draws[:, 0, 1] == 3) | (draws[:, 0, 1] == 4)).float().mean() > 0.9
    with pytest.raises(ValueError, match="below vocab_size"):
        train_masked_lm(rows, VOCAB_SIZE, VOCAB_SIZE, pad_id)


def test_target_logprob_scores_each_instance_target():
    model = tiny_gpt2()
    prompts = torch.randint(0, VOCAB_SIZE, (3, 3), generator=gen())
    targets = torch.randint(0, VOCAB_SIZE, (3, 2), generator=gen(1))
    score = target_logprob(model, targets)
    instance = torch.tensor([2, 0])
    got = score(prompts[instance], instance)
    for row, i in enumerate(instance.tolist()):
        logp = model(input_ids=torch.cat([prompts[i], targets[i]])[None]).logits[0].log_softmax(-1)
        expected = logp[2, targets[i, 0]] + logp[3, targets[i, 1]]
        assert got[row].item() == pytest.approx(expected.item(), abs=1e-5)


def test_prompt_token_test_on_a_causal_lm():
    model = tiny_gpt2()
    prompts = torch.randint(0, VOCAB_SIZE, (4, 4), generator=gen())
    targets = torch.randint(0, VOCAB_SIZE, (4, 2), generator=gen(1))
    test = FeatureTestInputs(prompts, target_logprob(model, targets), torch.arange(4))
    result = one_shot_test(test, CategoricalSampler(torch.ones(VOCAB_SIZE)), 0.2, two_sided=True)
    assert result.statistics.shape == (4, 4) and result.model_calls == 4 * (1 + 2 * 4)
