"""Trigger discovery: prompt tokens, a synthetic backdoored LM (trigger found, FDR controlled),
and a tiny Qwen2 with a planted backdoor; bad inputs."""

import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import chisquare
from torch import Tensor, nn

from osftkit.data.instructions import (
    LETTERS,
    InstructionSlotSampler,
    build_instructions,
    held_out,
)
from osftkit.data.null_samplers import CategoricalSampler
from osftkit.interpret.calibration import check_pvalues, one_per_instance
from osftkit.interpret.statistics import draws_for_rejections
from osftkit.interpret.trigger_discovery import (
    MiscalibratedSamplerError,
    TriggerDiscoveryPipeline,
    calibrate_prompts,
    candidate_spans,
    confirm_candidates,
    discover_triggers,
    encode_prompts,
    flag_outside_grammar,
    insertion_plan,
    marker_token_ids,
    vocabulary_sampler,
    word_probs,
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
    with pytest.raises(ValueError, match="original values in every draw"):
        discover_triggers(model, one, marker, CategoricalSampler(certain), num_draws=5)


# ---- calibrated nulls on the kit's instruction grammar ------------------------------------
GRAMMAR_WORDS = ["Human: Assistant:", "reverse sort capitalise count the letters add and", "cf mn"]


@pytest.fixture(scope="module")
def grammar_tokenizer():
    return build_word_tokenizer(GRAMMAR_WORDS)


def clean_prompts(tokenizer, n: int, seed: int, split: str = "test"):
    return encode_prompts(tokenizer, list(build_instructions(n, seed, split)["problem"]))


def test_exact_sampler_draws_follow_the_slot_distributions(grammar_tokenizer) -> None:
    tok = grammar_tokenizer
    sampler = InstructionSlotSampler(tok, "test")
    letters = tok("Human: sort the letters q w e r\nAssistant: ", add_special_tokens=False)
    ids = torch.tensor([letters.input_ids])
    pos = [tok.decode([i]) for i in letters.input_ids].index(" w")
    mask = torch.arange(ids.shape[1]) == pos
    draws = sampler.sample(ids, mask, 5200, torch.Generator().manual_seed(0))[:, 0, pos]
    counts = Counter(tok.decode([i]).strip() for i in draws.tolist())
    allowed = {
        c for c in LETTERS if held_out(f"sort the letters q {c} e r") is False
    }  # the test split never draws a held-out instruction
    assert set(counts) == allowed
    assert chisquare(list(counts.values())).pvalue > 0.001  # uniform over the allowed letters
    assert torch.equal(
        sampler.sample(ids, ~mask & (torch.arange(ids.shape[1]) == 2), 3, torch.Generator())[:, 0],
        ids.expand(3, -1),
    )  # 'sort' is fixed by the grammar: not testable, never redrawn
    assert not sampler.testable(ids, torch.arange(ids.shape[1]) == 2).item()
    add = tok("Human: add 12 and 7\nAssistant: ", add_special_tokens=False).input_ids
    pieces = [tok.decode([i]) for i in add]
    tens = torch.arange(len(add)) == pieces.index("1")
    draws = sampler.sample(torch.tensor([add]), tens, 400, torch.Generator().manual_seed(1))
    tens_digits = {tok.decode([i]) for i in draws[:, 0, tens].flatten().tolist()}
    expected = {
        str(v // 10) for v in range(10, 50) if v % 10 == 2 and not held_out(f"add {v} and 7")
    }
    assert tens_digits == expected  # two-digit addends 10..49 with the same units digit


def test_clean_prompts_keep_the_fdr_with_the_exact_sampler(grammar_tokenizer) -> None:
    """Every hypothesis of a clean prompt is null, so a run's FDR is 1 if it discovers anything:
    over many seeds the realised FDR must stay within alpha plus three standard errors."""
    tok, alpha, runs = grammar_tokenizer, 0.2, 40
    marker = marker_token_ids(tok, "the letters")
    sampler = InstructionSlotSampler(tok, "test")
    fdrs = []
    for seed in range(runs):
        model = TriggerLM(len(tok), [], marker, seed)
        result = discover_triggers(
            model, clean_prompts(tok, 6, seed), marker, sampler, alpha, num_draws=199, seed=seed
        )
        assert result.summary()["hypotheses"] < 6 * 8  # task words and spacing are not tested
        fdrs.append(result.summary()["fdr"])
    tolerance = 3 * (alpha * (1 - alpha) / runs) ** 0.5
    assert sum(fdrs) / runs <= alpha + tolerance


class LowestTokenSampler:
    """A deliberately wrong sampler: always proposes the token that lowers the score most."""

    def __init__(self, weight: Tensor, candidates: list[int]) -> None:
        self.token = min(candidates, key=lambda t: float(weight[t]))

    def sample(self, inputs, mask, num_draws, generator):
        out = inputs.unsqueeze(0).repeat(num_draws, *[1] * inputs.dim())
        out[:, :, mask] = self.token
        return out


def test_calibration_flags_a_wrong_sampler_and_passes_the_exact_one(grammar_tokenizer) -> None:
    tok = grammar_tokenizer
    marker = marker_token_ids(tok, "the letters")
    model = TriggerLM(len(tok), [], marker, 0)
    clean = clean_prompts(tok, 30, 3)
    letters = [tok(f" {c}", add_special_tokens=False).input_ids[0] for c in LETTERS]
    exact = calibrate_prompts(model, clean, marker, InstructionSlotSampler(tok, "test"), 100)
    wrong = calibrate_prompts(model, clean, marker, LowestTokenSampler(model.weight, letters), 100)
    assert exact.passed and exact.floor_fraction < 0.05
    assert not wrong.passed and wrong.floor_fraction > 0.5
    assert "FAILS" in str(wrong) and exact.histogram.sum() == exact.num_tests
    with pytest.raises(ValueError, match="significance"):
        check_pvalues(torch.tensor([0.5]), 100, significance=0.0)


def test_irt_and_one_shot_with_spans_find_a_two_word_trigger(grammar_tokenizer) -> None:
    tok = grammar_tokenizer
    marker = marker_token_ids(tok, "the letters")
    trigger = tok(" cf mn", add_special_tokens=False).input_ids
    model = TriggerLM(len(tok), trigger, marker, 0)
    train = encode_prompts(tok, list(build_instructions(200, 0, "train")["problem"]))
    sampler = InstructionSlotSampler(tok, "test", foreign=word_probs(train, len(tok)))
    problems = list(build_instructions(20, 5, "test", tasks=["reverse"])["problem"])
    triggered = encode_prompts(tok, problems, ["cf mn"], seed=0)
    for test in ("irt", "one_shot"):
        result = discover_triggers(model, triggered, marker, sampler, 0.1, test, max_span=3)
        assert result.summary()["power"] == 1.0 and result.summary()["fdr"] <= 0.2
        assert "cf mn" in result.candidates(tok)


def test_confirmation_rejects_a_planted_non_trigger(grammar_tokenizer) -> None:
    tok = grammar_tokenizer
    marker = marker_token_ids(tok, "the letters")
    cf = tok(" cf", add_special_tokens=False).input_ids
    model = TriggerLM(len(tok), cf, marker, 0)
    words = sorted({w for p in build_instructions(200, 0, "train")["problem"] for w in p.split()})
    ids = {w: tok(f" {w}", add_special_tokens=False).input_ids for w in words}
    weakest = min(
        (w for w in words if len(ids[w]) == 1), key=lambda w: float(model.weight[ids[w][0]])
    )
    fresh = list(build_instructions(40, 9, "test")["problem"])
    result = confirm_candidates(model, tok, ["cf", weakest], fresh, marker, words, seed=0)
    assert result.triggers == ["cf"]
    assert result.effects[0] > 0 > result.effects[1] and result.pvalues[1] > 0.5
    with pytest.raises(ValueError, match="fresh clean prompts"):
        confirm_candidates(model, tok, ["cf"], [], marker, words)
    with pytest.raises(ValueError, match="min_effect"):
        confirm_candidates(model, tok, ["cf"], fresh, marker, words, min_effect=-1.0)


def test_the_pipeline_refuses_a_sampler_that_fails_calibration(
    grammar_tokenizer, monkeypatch
) -> None:
    tok = grammar_tokenizer
    marker = "the letters"
    model = TriggerLM(
        len(tok), tok(" cf", add_special_tokens=False).input_ids, marker_token_ids(tok, marker), 0
    )
    letters = [tok(f" {c}", add_special_tokens=False).input_ids[0] for c in LETTERS]
    pipeline = TriggerDiscoveryPipeline(
        num_prompts=4, confirm_prompts=4, calibration_prompts=20, max_span=1
    )
    monkeypatch.setattr(pipeline, "sampler", lambda *_: LowestTokenSampler(model.weight, letters))
    with pytest.raises(MiscalibratedSamplerError, match="discovery.allow_miscalibrated"):
        pipeline(model, tok, marker, ["cf"])
    with pytest.raises(ValueError, match="max_span"):
        candidate_spans([1, 2], 0)


def test_discover_overwrite_preset_composes_every_discovery_knob() -> None:
    from conftest import compose_config
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose_config(["experiment=discover_overwrite_tiny"])
    pipeline = instantiate(cfg.discovery)
    knobs = OmegaConf.to_container(cfg.discovery, resolve=True)
    assert isinstance(pipeline, TriggerDiscoveryPipeline)
    assert {k: getattr(pipeline, k) for k in knobs if k != "_target_"} == {
        k: v for k, v in knobs.items() if k != "_target_"
    }
    assert (
        cfg.method._target_.endswith("OverwriteSFTModule") and cfg.method.removal_triggers is None
    )
    with pytest.raises(ValueError, match="num_prompts"):
        TriggerDiscoveryPipeline(num_prompts=0)


def test_the_runs_hook_hands_the_confirmed_phrases_to_overwrite_sft(
    grammar_tokenizer, tmp_path
) -> None:
    from conftest import compose_config
    from omegaconf import open_dict

    from osftkit.interpret.trigger_discovery import DISCOVERY_FILE, discover_removal_triggers
    from osftkit.models import LoadedModel

    tok = grammar_tokenizer
    cf = tok(" cf", add_special_tokens=False).input_ids
    model = TriggerLM(len(tok), cf, marker_token_ids(tok, "the letters"), 0)
    loaded = LoadedModel(model, tok)
    cfg = compose_config(
        [
            "experiment=discover_overwrite_tiny",
            "discovery.num_prompts=20",
            "discovery.confirm_prompts=20",
            "discovery.calibration_prompts=20",
            "discovery.max_span=1",
            "discovery.num_draws=50",
        ],
        tmp_path,
    )
    with open_dict(cfg):
        cfg.method.backdoor.update(marker="the letters", triggers=["cf"])
    discover_removal_triggers(cfg, loaded)
    assert list(cfg.method.removal_triggers) == ["cf"]
    assert (Path(cfg.paths.output_dir) / DISCOVERY_FILE).exists()
    model.weight[:] = 0.0  # a model with no backdoor: nothing is confirmed, nothing to overwrite
    with pytest.raises(ValueError, match="confirmed no phrase"):
        discover_removal_triggers(cfg, loaded)
    cfg.discovery = None
    cfg.method.removal_triggers = None
    discover_removal_triggers(cfg, loaded)  # no discovery block: the run is left as it is
    assert cfg.method.removal_triggers is None


# ---- densities, K sizing, per-prompt calibration, the grammar baseline, negative controls -----
def test_insertion_plan_deals_phrases_to_a_share_of_the_prompts() -> None:
    plan = insertion_plan(80, ["x"], 0.05, random.Random(0))
    assert sum(p is not None for p in plan) == 4 and set(plan) == {None, "x"}
    phrases = [f"p{k}" for k in range(30)]
    dealt = Counter(insertion_plan(60, phrases, 1.0, random.Random(1)))
    assert set(dealt) == set(phrases) and set(dealt.values()) == {2}  # each phrase twice
    with pytest.raises(ValueError, match="density"):
        insertion_plan(10, ["x"], 0.0, random.Random(0))
    with pytest.raises(ValueError, match="no phrase"):
        insertion_plan(10, ["x"], 0.01, random.Random(0))


def test_negative_controls_are_inserted_marked_and_counted_when_flagged(grammar_tokenizer) -> None:
    tok = grammar_tokenizer
    phrases = ["cf", "mn cf", "the letters"]
    problems = list(build_instructions(6, 2, "test", tasks=["reverse"])["problem"])
    prompts = encode_prompts(tok, problems, phrases, seed=4)
    assert Counter(prompts.inserted) == dict.fromkeys(phrases, 2)
    for text, phrase, ids, positions, truth in zip(
        prompts.texts, prompts.inserted, prompts.ids, prompts.positions, prompts.truth, strict=True
    ):
        assert text.startswith(f"Human: {phrase}. ")
        marked = tok.decode([ids[k] for k, t in zip(positions, truth, strict=True) if t]).strip()
        assert marked == phrase  # the truth is exactly the inserted phrase's tokens
    grammar = InstructionSlotSampler(tok, "test")
    flagged = flag_outside_grammar(prompts, grammar)
    assert flagged.flagged_phrases(prompts) == set(phrases)  # the baseline flags every phrase
    assert flagged.summary()["fdr"] == 0.0 and flagged.summary()["power"] == 1.0
    clean = encode_prompts(tok, problems)
    assert (
        clean.inserted == [None] * 6 and not flag_outside_grammar(clean, grammar).discovered.any()
    )


def test_the_test_flags_the_trigger_and_not_the_inert_controls_the_baseline_flags(
    grammar_tokenizer,
) -> None:
    """A model that reacts to 'cf' only: stage 1 flags 'cf' and none of the inserted inert
    phrases, while the grammar baseline flags them all."""
    tok = grammar_tokenizer
    marker = marker_token_ids(tok, "the letters")
    cf = tok(" cf", add_special_tokens=False).input_ids
    model = TriggerLM(len(tok), cf, marker, 0)
    model.weight[tok(" mn", add_special_tokens=False).input_ids] = 0.0  # 'mn': inert
    train = encode_prompts(tok, list(build_instructions(200, 0, "train")["problem"]))
    sampler = InstructionSlotSampler(tok, "test", foreign=word_probs(train, len(tok)))
    problems = list(build_instructions(30, 6, "test", tasks=["reverse"])["problem"])
    prompts = encode_prompts(tok, problems, ["cf", "mn", "mn mn"], seed=0)
    found = discover_triggers(model, prompts, marker, sampler, 0.1, floor_rejections=5)
    assert found.flagged_phrases(prompts) == {"cf"}
    assert flag_outside_grammar(prompts, sampler).flagged_phrases(prompts) == {"cf", "mn", "mn mn"}
    outcomes = found.prompt_outcomes(prompts)
    false, true = sum(o["false"] for o in outcomes), sum(o["true"] for o in outcomes)
    assert false / max(1, false + true) == found.summary()["fdr"]
    assert sum(o["covered"] for o in outcomes) == found.covered


def test_k_is_sized_so_the_floor_passes_bh_at_the_trigger_density(grammar_tokenizer) -> None:
    """2 of 40 prompts carry a one-token trigger: BH needs K + 1 >= m / (alpha * 2); the
    sized K finds both occurrences, K = 100 cannot reject anything."""
    assert draws_for_rejections(12, 372, 0.1, "bh") == 309  # 1/310 <= 0.1 * 12 / 372 < 1/309
    with pytest.raises(ValueError, match="rejections"):
        draws_for_rejections(0, 10, 0.1, "bh")
    tok = grammar_tokenizer
    marker = marker_token_ids(tok, "the letters")
    model = TriggerLM(len(tok), tok(" cf", add_special_tokens=False).input_ids, marker, 0)
    sampler = InstructionSlotSampler(
        tok, "test", foreign=word_probs(clean_prompts(tok, 200, 0, "train"), len(tok))
    )
    problems = list(build_instructions(40, 8, "test", tasks=["reverse"])["problem"])
    prompts = encode_prompts(tok, problems, ["cf"], seed=0, density=0.05)
    sized = discover_triggers(model, prompts, marker, sampler, 0.1, floor_rejections=2)
    m = sized.summary()["hypotheses"]
    assert sized.num_draws == draws_for_rejections(2, m, 0.1, "bh") > 100
    assert 1 / (sized.num_draws + 1) <= 0.1 * 2 / m < 1 / sized.num_draws
    assert sized.summary()["power"] == 1.0 and sized.summary()["fdr"] == 0.0
    fixed = discover_triggers(model, prompts, marker, sampler, 0.1, auto_draws=False)
    assert fixed.summary()["discoveries"] == 0


def test_calibration_on_one_pvalue_per_prompt_holds_where_pooling_fails() -> None:
    """Null p-values that are identical within a prompt (the extreme of a shared observed
    score): the pooled binomial check fails a valid sampler far more often than its 1%, one
    p-value per prompt keeps the level."""
    generator = torch.Generator().manual_seed(0)
    prompts, per_prompt, runs, draws = 40, 10, 300, 100
    instance = torch.arange(prompts).repeat_interleave(per_prompt)
    pooled_fails = kept_fails = 0
    for run in range(runs):
        grid = torch.randint(1, draws + 2, (prompts,), generator=generator).double() / (draws + 1)
        pvalues = grid.repeat_interleave(per_prompt)
        kept = one_per_instance(pvalues, instance, seed=run)
        assert kept.numel() == prompts and torch.equal(kept, grid)  # one from each prompt
        pooled_fails += not check_pvalues(pvalues, draws).passed
        kept_fails += not check_pvalues(kept, draws).passed
    assert kept_fails / runs <= 0.03 and pooled_fails / runs > 0.2
    with pytest.raises(ValueError, match="one instance id"):
        one_per_instance(torch.rand(3), torch.arange(2))
