"""Micro-batches: split gradients equal the unsplit mini-batch gradient for every aggregation
mode, the token budget holds, every row is used once, rows are trimmed; bad settings fail."""

import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from osftkit.methods import GRPOModule, OSFTModule
from osftkit.methods.losses import AGGREGATIONS, masked_mean, token_weights
from osftkit.methods.micro_batches import MicroBatching, TokenBatch, scatter_back
from osftkit.methods.optimisation import backpropagate, weighted
from osftkit.train import build_components, run
from tests.conftest import changed_weights

VOCAB, MAX_RESPONSE = 61, 12


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).train()


def rows_of_many_lengths(num_rows: int = 6, seed: int = 0, width_p: int = 7) -> TokenBatch:
    """Left-padded prompts and right-padded responses, lengths drawn at random."""
    gen = random.Random(seed)
    ids = torch.randint(
        2, VOCAB, (num_rows, width_p + MAX_RESPONSE), generator=torch.Generator().manual_seed(seed)
    )
    mask = torch.zeros_like(ids)
    for row in range(num_rows):
        prompt, response = gen.randint(1, width_p), gen.randint(1, MAX_RESPONSE)
        mask[row, width_p - prompt : width_p + response] = 1
    score = mask.clone()
    score[:, :width_p] = 0
    return TokenBatch(ids.masked_fill(mask == 0, 0), mask, score[:, 1:].bool())


def module(model, cls=OSFTModule, **knobs):
    extra = {"tau_train": 1.0} if cls is OSFTModule else {}
    recipe = cls.recipe_type(
        group_size=1, tau_sample=0.6, max_new_tokens=MAX_RESPONSE, kl_coef=0.1, **extra, **knobs
    )
    return cls(model, None, recipe)


def gradients(m, batch: TokenBatch) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    m.model.zero_grad()
    batch = TokenBatch(batch.input_ids, batch.attention_mask, batch.score_mask, dict(batch.per_row))
    minibatch = weighted(batch, m.recipe.loss_aggregation, MAX_RESPONSE)
    # The gradients of one optimiser step, without the step (no Trainer, no optimiser).
    totals = backpropagate(m.micro_batches(minibatch), m.minibatch_loss, torch.Tensor.backward, 0)
    return totals, [p.grad.clone() for p in m.model.parameters()]


SPLITS = [{"micro_batch_size": 1}, {"micro_batch_size": 4}, {"max_tokens_per_micro_batch": 40}]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("split", SPLITS)
def test_split_gradient_equals_unsplit_for_every_aggregation(model, aggregation, split):
    batch = rows_of_many_lengths()
    whole, whole_grads = gradients(module(model, loss_aggregation=aggregation), batch)
    parts, part_grads = gradients(module(model, loss_aggregation=aggregation, **split), batch)
    for name in ("loss", "entropy", "kl"):
        torch.testing.assert_close(parts[name], whole[name], atol=1e-6, rtol=1e-5)
    for got, want in zip(part_grads, whole_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_grpo_old_logprobs_and_advantages_split_with_the_rows(model):
    batch = rows_of_many_lengths(seed=3)
    grpo = module(model, GRPOModule, micro_batch_size=2)
    old, _ = grpo.score_tokens(batch, 1.0, with_entropy=False)
    whole_logp, _ = module(model, GRPOModule).score_tokens(batch, 1.0, with_entropy=False)
    torch.testing.assert_close(old, whole_logp, atol=1e-6, rtol=1e-5)  # scatter_back is exact
    batch.per_row.update(advantages=torch.randn(batch.num_rows), old_logp=old - 0.05)
    whole, whole_grads = gradients(module(model, GRPOModule), batch)
    parts, part_grads = gradients(grpo, batch)
    torch.testing.assert_close(parts["loss"], whole["loss"], atol=1e-6, rtol=1e-5)
    for got, want in zip(part_grads, whole_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("seed", range(20))
def test_token_budget_holds_and_keeps_every_row_once(seed):
    batch = rows_of_many_lengths(num_rows=13, seed=seed)
    budget = random.Random(seed).randint(MAX_RESPONSE + 7, 120)
    pieces = MicroBatching(max_tokens_per_micro_batch=budget).split(batch)
    used = torch.cat([rows for rows, _ in pieces]).sort().values
    assert used.tolist() == list(range(13))
    for _, part in pieces:
        assert part.input_ids.numel() <= budget
        attended = part.attention_mask.bool()
        assert attended[:, 0].any() and attended[:, -1].any()  # trimmed to its longest row
    assert sum(p.score_mask.sum() for _, p in pieces) == batch.score_mask.sum()


def test_micro_batch_size_rows_per_forward_and_scatter_back():
    batch = rows_of_many_lengths(num_rows=7)
    pieces = MicroBatching(micro_batch_size=3).split(batch)
    assert [p.num_rows for _, p in pieces] == [3, 3, 1]
    values = [part.score_mask.float() * (i + 1) for i, (_, part) in enumerate(pieces)]
    back = scatter_back(batch, pieces, values)
    assert torch.equal(back.bool(), batch.score_mask)


def test_aggregation_modes_on_a_known_batch():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert masked_mean(values, mask, "token-mean") == pytest.approx(10 / 4)
    assert masked_mean(values, mask, "seq-mean-token-sum") == pytest.approx((6 + 4) / 2)
    assert masked_mean(values, mask, "seq-mean-token-mean") == pytest.approx((2 + 4) / 2)
    assert masked_mean(values, mask, "seq-mean-token-sum-norm", 5) == pytest.approx(10 / 10)
    with pytest.raises(ValueError, match="maximum response length"):
        token_weights(mask, "seq-mean-token-sum-norm")


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"micro_batch_size": 0}, r"micro_batch_size must be >= 1, got 0"),
        ({"max_tokens_per_micro_batch": 0}, r"max_tokens_per_micro_batch must be >= 1"),
        (
            {"micro_batch_size": 2, "max_tokens_per_micro_batch": 64},
            r"Set micro_batch_size or max_tokens_per_micro_batch, not both",
        ),
        ({"loss_aggregation": "token_mean"}, r"loss_aggregation must be one of"),
    ],
)
def test_bad_settings_fail_at_construction(model, knobs, message):
    with pytest.raises(ValueError, match=message):
        module(model, **knobs)


def test_bad_settings_in_the_config_name_the_knob(fast_cfg):
    with pytest.raises(ValueError, match=r"micro_batch_size must be >= 1, got 0"):
        build_components(fast_cfg("method=osft", "method.micro_batch_size=0"))
    with pytest.raises(ValueError, match=r"loss_aggregation must be one of"):
        build_components(fast_cfg("method=grpo", "method.loss_aggregation=mean"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.micro_batch_size=9"], r"micro_batch_size=9 is larger than the mini-batch"),
        (["method.max_tokens_per_micro_batch=40"], r"max_tokens_per_micro_batch=40 is smaller"),
    ],
)
def test_settings_that_do_not_fit_the_data_fail_before_training(fast_cfg, overrides, message):
    with pytest.raises(ValueError, match=message):
        run(fast_cfg("method=osft", "validate_before_fit=false", *overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=sft", "method.micro_batch_size=3"],
        ["method=osft", "method.max_tokens_per_micro_batch=256", "method.num_minibatches=2"],
        [
            "method=grpo",
            "method.group_size=2",
            "method.micro_batch_size=4",
            "method.num_minibatches=2",
        ],
        ["method=sft", "model.gradient_checkpointing=true", "method.micro_batch_size=4"],
    ],
)
def test_methods_train_with_micro_batches(fast_cfg, tmp_path, overrides):
    metrics = run(fast_cfg(*overrides))
    assert {"val/pass@1", "val/entropy"} <= set(metrics)
    changed, total = changed_weights(tmp_path)  # the micro-batches' gradients reached the weights
    assert len(changed) > total // 2, changed


def test_gradient_checkpointing_gives_the_same_gradient(tmp_path, fast_cfg):
    from hydra.utils import instantiate

    grads = []
    for checkpointing in (False, True):
        cfg = fast_cfg(f"model.gradient_checkpointing={checkpointing}")
        loaded = instantiate(cfg.model)
        assert loaded.model.is_activation_checkpointing is checkpointing
        loaded.model.train()
        batch = rows_of_many_lengths(num_rows=3)
        ids = batch.input_ids % len(loaded.tokenizer)
        m = module(loaded.model)
        m.reference = None
        totals, grad = gradients(m, TokenBatch(ids, batch.attention_mask, batch.score_mask))
        grads.append(grad)
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
