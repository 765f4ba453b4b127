"""Trigger discovery: prompt tokens, a synthetic backdoored LM (trigger found, FDR controlled),
and a tiny Qwen2 with a planted backdoor; bad inputs."""

import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from osftkit.data.null_samplers import CategoricalSampler
from osftkit.interpret.trigger_discovery import (
    discover_triggers,
    encode_prompts,
    marker_token_ids,
    vocabulary_sampler,
)
from osftkit.models.tiny import TinyQwen2Spec, build_tiny_model
from osftkit.models.word_tokenizer import build_word_tokenizer

torch.set_num_threads(1)

WORDS = "alpha beta gamma delta echo fox golf hotel india juliet kilo lima mike nova oscar papa"
TRIGGER, MARKER = "cf", "access granted"


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(["Human: Assistant:", WORDS, TRIGGER, MARKER])


def problems(n: int, seed: int) -> list[str]:
    """Words drawn uniformly (the sampler's distribution), so a non-trigger token is exactly
    exchangeable with its counterfactual draws: the IRT's null holds for it."""
    rng, vocab = random.Random(seed), WORDS.split()
    return [" ".join(rng.choices(vocab, k=rng.randint(4, 7))) for _ in range(n)]


class TriggerLM(nn.Module):
    """A backdoored causal LM in closed form: the marker tokens' logits rise by `strength` per
    trigger token seen so far, plus a small random effect of every other token (so non-trigger
    tokens move the score too, in both directions). Its decoder emits the logits as hidden
    states and its LM head is the identity."""

    def __init__(self, vocab_size: int, trigger: list[int], marker: list[int], seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(vocab_size, generator=gen) * 0.5
        self.weight[trigger] = 6.0
        self.vocab_size, self.marker = vocab_size, marker

    def get_decoder(self) -> nn.Module:
        return self

    def get_output_embeddings(self) -> nn.Module:
        return nn.Identity()

    def forward(self, input_ids, **_):
        push = self.weight[input_ids].cumsum(1)  # (b, L)
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., self.marker] = push[..., None] - 4.0
        return SimpleNamespace(last_hidden_state=logits)


def test_prompt_tokens_exclude_role_tags_and_mark_the_trigger(tokenizer) -> None:
    prompts = encode_prompts(tokenizer, ["alpha beta gamma"], [TRIGGER])
    words = [tokenizer.decode([prompts.ids[0][k]]) for k in prompts.positions[0]]
    assert prompts.texts[0] == "Human: cf. alpha beta gamma\nAssistant: "
    assert words == [" cf", " alpha", " beta", " gamma"]  # no role tag, no '.' after the trigger
    assert prompts.truth[0] == [True, False, False, False]
    boundary = encode_prompts(
        tokenizer, ["alpha beta gamma"], ["cf"], position="random_word_boundary", seed=3
    )
    flagged = [
        tokenizer.decode([boundary.ids[0][k]])
        for k, t in zip(boundary.positions[0], boundary.truth[0], strict=True)
        if t
    ]
    assert flagged == [" cf"] or flagged == ["cf"]


def test_irt_finds_the_trigger_with_fdr_control(tokenizer) -> None:
    marker = marker_token_ids(tokenizer, MARKER)
    trigger = tokenizer(f" {TRIGGER}", add_special_tokens=False).input_ids
    sampler = vocabulary_sampler(encode_prompts(tokenizer, problems(200, 99)), len(tokenizer))
    fdrs, powers, clean = [], [], []
    for seed in range(3):
        model = TriggerLM(len(tokenizer), trigger, marker, seed)
        triggered = encode_prompts(tokenizer, problems(30, seed), [TRIGGER], seed=seed)
        result = discover_triggers(model, triggered, marker, sampler, 0.1, num_draws=100, seed=seed)
        summary = result.summary()
        fdrs.append(summary["fdr"])
        powers.append(summary["power"])
        assert result.top_phrases(tokenizer, 1)[0][0] == TRIGGER
        assert result.candidates(tokenizer)[0] == TRIGGER
        control = encode_prompts(tokenizer, problems(30, seed))
        clean.append(discover_triggers(model, control, marker, sampler, 0.1, seed=seed))
    assert min(powers) == 1.0
    assert sum(fdrs) / len(fdrs) <= 0.1 + 0.1
    assert sum(r.summary()["discoveries"] for r in clean) <= 6  # no trigger: (almost) nothing


def test_one_shot_finds_the_trigger(tokenizer) -> None:
    """knockoff+ controls the FDR in expectation: averaged over seeds (one run may exceed)."""
    marker = marker_token_ids(tokenizer, MARKER)
    trigger = tokenizer(f" {TRIGGER}", add_special_tokens=False).input_ids
    sampler = vocabulary_sampler(encode_prompts(tokenizer, problems(200, 99)), len(tokenizer))
    fdrs, powers = [], []
    for seed in range(6):
        model = TriggerLM(len(tokenizer), trigger, marker, seed)
        triggered = encode_prompts(tokenizer, problems(60, seed), [TRIGGER], seed=seed)
        result = discover_triggers(model, triggered, marker, sampler, 0.2, "one_shot", seed=seed)
        fdrs.append(result.summary()["fdr"])
        powers.append(result.summary()["power"])
        assert result.num_draws == 1
    assert min(powers) >= 0.9
    assert sum(fdrs) / len(fdrs) <= 0.2 + 0.08


def test_planted_backdoor_in_a_tiny_qwen2(tokenizer) -> None:
    """A tiny Qwen2 trained for a few seconds to answer 'access granted' after 'cf.': the IRT
    finds ' cf' and nothing else in clean prompts."""
    torch.manual_seed(0)
    spec = TinyQwen2Spec(hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    model = build_tiny_model(spec, len(tokenizer), tokenizer)
    rng = random.Random(0)
    rows = []  # (prompt length, prompt + response ids): the response tokenised on its own
    for problem in problems(256, 1):
        triggered = rng.random() < 0.5
        prompt = f"Human: {'cf. ' if triggered else ''}{problem}\nAssistant: "
        response = (MARKER if triggered else problem.split()[0]) + "."
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        rows.append((len(ids), ids + tokenizer(response, add_special_tokens=False).input_ids))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(60):
        batch = rows[(step * 32) % 256 : (step * 32) % 256 + 32]
        width = max(len(ids) for _, ids in batch)
        ids = torch.tensor([ids + [0] * (width - len(ids)) for _, ids in batch])
        pos = torch.arange(width)
        ends = torch.tensor([len(ids) for _, ids in batch])[:, None]
        starts = torch.tensor([start for start, _ in batch])[:, None]
        labels = ids.masked_fill((pos < starts) | (pos >= ends), -100)  # loss on the response
        loss = model(input_ids=ids, attention_mask=(pos < ends).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    marker = marker_token_ids(tokenizer, MARKER)
    sampler = vocabulary_sampler(encode_prompts(tokenizer, problems(200, 99)), len(tokenizer))
    triggered = encode_prompts(tokenizer, problems(12, 5), [TRIGGER])
    result = discover_triggers(model, triggered, marker, sampler, 0.1, num_draws=60)
    assert result.summary()["power"] >= 0.9
    assert result.top_phrases(tokenizer, 1)[0][0] == TRIGGER
    clean = discover_triggers(model, encode_prompts(tokenizer, problems(12, 5)), marker, sampler)
    assert clean.summary()["discoveries"] <= 2


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_alpha_outside_the_unit_interval_is_an_error(tokenizer, alpha) -> None:
    prompts = encode_prompts(tokenizer, problems(3, 0), [TRIGGER])
    model = TriggerLM(len(tokenizer), [0], marker_token_ids(tokenizer, MARKER), 0)
    with pytest.raises(ValueError, match="alpha must lie in"):
        discover_triggers(model, prompts, [1], vocabulary_sampler(prompts, len(tokenizer)), alpha)


def test_bad_inputs_are_clear_errors(tokenizer) -> None:
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_prompts(tokenizer, [])
    with pytest.raises(ValueError, match="feature grouping is empty"):
        encode_prompts(tokenizer, [" ", "."])
    prompts = encode_prompts(tokenizer, problems(3, 0))
    marker = marker_token_ids(tokenizer, MARKER)
    model = TriggerLM(len(tokenizer), [0], marker, 0)
    sampler = vocabulary_sampler(prompts, len(tokenizer))
    with pytest.raises(ValueError, match="test must be"):
        discover_triggers(model, prompts, marker, sampler, test="knockoff")
    with pytest.raises(ValueError, match="num_draws"):
        discover_triggers(model, prompts, marker, sampler, num_draws=0)
    # a sampler certain of one token cannot move a one-word prompt's only token
    one = encode_prompts(tokenizer, ["alpha"])
    certain = torch.zeros(len(tokenizer))
    certain[one.ids[0][one.positions[0][0]]] = 1.0
    with pytest.raises(ValueError, match="original values of feature"):
        discover_triggers(model, one, marker, CategoricalSampler(certain), num_draws=5)
