"""The one log-prob path: chunked LM head on the scored positions equals the naive full
log_softmax (values, entropies, gradients), with left padding, temperatures, embeddings, LoRA."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from osftkit.models.logprobs import next_token_logprobs, position_ids_from_mask, token_logprobs

VOCAB = 97


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).train()


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts + right-padded responses of different lengths, and the response mask
    over next-token positions."""
    gen = torch.Generator().manual_seed(seed)
    prompts, responses, width_p, width_r = [3, 7, 5], [6, 2, 9], 8, 10
    ids = torch.randint(2, VOCAB, (3, width_p + width_r), generator=gen)
    mask = torch.zeros_like(ids)
    score = torch.zeros_like(ids)
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        mask[row, width_p - p : width_p + r] = 1
        score[row, width_p : width_p + r] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, score[:, 1:].bool()


def naive(model, ids, mask, temperature):
    """Today's reference: logits of every position, a full log_softmax, its exp for entropy."""
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
    ).logits[:, :-1]
    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
    chosen = log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return chosen, -(log_probs.exp() * log_probs).sum(-1)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_chunked_equals_naive_values_entropies_and_gradients(model, temperature, chunk_size):
    ids, mask, score = padded_batch()
    model.zero_grad()
    ref_logp, ref_entropy = naive(model, ids, mask, temperature)
    (-(ref_logp * score).sum() / score.sum()).backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logp, entropy = token_logprobs(
        model,
        input_ids=ids,
        attention_mask=mask,
        score_mask=score,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    assert not entropy.requires_grad
    torch.testing.assert_close(logp, ref_logp * score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy * score, atol=1e-5, rtol=1e-5)
    (-(logp * score).sum() / score.sum()).backward()
    for grad, ref in zip([p.grad for p in model.parameters()], ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-4)


def test_inputs_embeds_with_targets_equal_input_ids(model):
    ids, mask, score = padded_batch(1)
    with torch.no_grad():
        from_ids, _ = token_logprobs(model, input_ids=ids, attention_mask=mask, score_mask=score)
        embeds = model.get_input_embeddings()(ids)
        from_embeds, none = token_logprobs(
            model,
            inputs_embeds=embeds,
            targets=ids,
            attention_mask=mask,
            score_mask=score,
            with_entropy=False,
        )
    assert none is None
    torch.testing.assert_close(from_embeds, from_ids)


def test_left_padding_does_not_change_a_row(model):
    ids, mask, score = padded_batch(2)
    with torch.no_grad():
        batched, _ = token_logprobs(model, input_ids=ids, attention_mask=mask, score_mask=score)
        for row in range(ids.shape[0]):
            start, stop = mask[row].nonzero()[[0, -1], 0].tolist()
            alone, _ = token_logprobs(
                model,
                input_ids=ids[row, start : stop + 1][None],
                attention_mask=mask[row, start : stop + 1][None],
                score_mask=score[row, start:stop][None],
            )
            torch.testing.assert_close(alone.sum(), batched[row].sum(), atol=1e-5, rtol=1e-5)


def test_lora_wrapped_model_goes_through_the_same_path(model):
    import copy

    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    ids, mask, score = padded_batch(3)
    logp, _ = token_logprobs(wrapped, input_ids=ids, attention_mask=mask, score_mask=score)
    ref, _ = naive(wrapped, ids, mask, 1.0)
    torch.testing.assert_close(logp, ref * score, atol=1e-5, rtol=1e-5)
    (-logp.sum()).backward()
    lora = [p for n, p in wrapped.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None for p in lora)


def test_next_token_logprobs_is_the_last_column(model):
    ids, mask, _ = padded_batch(4)
    ids, mask = ids[:, :8], mask[:, :8]  # prompts only: left padded, last column real
    with torch.no_grad():
        got = next_token_logprobs(model, ids, mask)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits
    torch.testing.assert_close(got, logits[:, -1].float().log_softmax(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"chunk_size": 0}, "logprob_chunk_size must be >= 1"),
    ],
)
def test_bad_arguments(model, kwargs, message):
    ids, mask, score = padded_batch()
    with pytest.raises(ValueError, match=message):
        token_logprobs(model, input_ids=ids, attention_mask=mask, score_mask=score, **kwargs)
