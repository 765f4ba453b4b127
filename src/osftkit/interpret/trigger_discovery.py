"""Trigger discovery: which prompt spans make a backdoored causal LM emit its marker?

Stage 1 (propose): one hypothesis per (prompt i, span j of 1-``max_span`` adjacent instruction
word tokens): does log p(marker | prompt_i) depend on span j beyond a draw from a counterfactual
sampler? Removing a trigger should LOWER log p(marker), so the statistic is one-sided,
T = f(x) - f(x~), with f = :func:`osftkit.interpret.lm_scores.target_logprob`. The counterfactual
scoring and the IRT (BH/BY) or one-shot (knockoff+) decisions are the engine's
(:mod:`osftkit.interpret.engine`): prompts are scored in buckets of equal token length, each
bucket one ``FeatureTestInputs`` with one boolean mask per span, and all buckets are pooled into
one selection. Only the instruction's word tokens are candidates: role tags, whitespace and
the ``.`` after an inserted trigger never are, and a sampler may exclude more (the exact
grammar sampler excludes every position its grammar fixes).

Stage 2 (confirm, :func:`confirm_candidates`): each proposed phrase is inserted into fresh
clean prompts, never seen by stage 1, beside a random control phrase of as many words; a
sign-flip test of the paired differences of log p(marker) gives one p-value per candidate, and
BY (the candidates share prompts: their dependence is not known to be positive) or BH selects.
The FDR statement is stage 2's: see experiments/feature_tests/README.md for its assumptions.

:func:`calibrate_prompts` runs stage 1 on clean prompts (every hypothesis null) and checks the
p-values (:func:`osftkit.interpret.calibration.check_pvalues`); :class:`TriggerDiscoveryPipeline`
refuses a sampler that fails it, then proposes, confirms and returns the removal triggers.
"""

import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from osftkit.backdoor.poison import Position, insert_trigger, token_ids
from osftkit.data.instructions import PLAIN_TEMPLATE, InstructionSlotSampler, build_instructions
from osftkit.data.null_samplers import CategoricalSampler, Sampler
from osftkit.interpret.calibration import Calibration, check_pvalues
from osftkit.interpret.engine import (
    FeatureTestInputs,
    counterfactual_scores,
    irt_decision,
    observed_scores,
    one_shot_decision,
    score_batched,
    sized_draws,
    tested_hypotheses,
)
from osftkit.interpret.fdr import FdrMethod, check_alpha, step_up_reject
from osftkit.interpret.lm_scores import target_logprob
from osftkit.interpret.statistics import seeded_generator

log = logging.getLogger(__name__)
Test = Literal["irt", "one_shot"]
DISCOVERY_FILE = "discovery.json"
SEED_STRIDE = 1000  # prompt sets of one pipeline seed never share a generator seed


@dataclass
class PromptTokens:
    """Tokenised prompts, the positions to test in each, and which of them are trigger tokens."""

    ids: list[list[int]]
    positions: list[list[int]]
    truth: list[list[bool]]
    texts: list[str]

    def __post_init__(self) -> None:
        if not self.ids:
            raise ValueError("trigger discovery needs at least one prompt, got none")
        if not any(self.positions):
            raise ValueError("the feature grouping is empty: no prompt has a token to test")

    @property
    def num_hypotheses(self) -> int:
        return sum(len(p) for p in self.positions)


def trigger_span(clean: str, triggered: str, trigger: str, position: Position) -> tuple[int, int]:
    """Character span of `trigger` inside `triggered` (insert_trigger's output for `clean`)."""
    if position == "after_role_tag":
        return 0, len(trigger)
    words, inserted = triggered.split(" "), trigger.split(" ")
    clean_words = clean.split(" ")
    for at in range(len(words) - len(inserted) + 1):
        if words[at : at + len(inserted)] == inserted and (
            words[:at] + words[at + len(inserted) :] == clean_words
        ):
            start = sum(len(w) + 1 for w in words[:at])
            return start, start + len(trigger)
    raise ValueError(f"trigger '{trigger}' not found in '{triggered}'")


def is_word(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[str],
    triggers: Sequence[str] | None = None,
    position: Position = "after_role_tag",
    template: str = PLAIN_TEMPLATE,
    words_only: bool = True,
    seed: int = 0,
) -> PromptTokens:
    """Prompts from instructions, with one of `triggers` inserted (seeded) when given.

    The tested positions are the tokens inside the instruction's character span (the template's
    role tags lie outside it); the truth marks tokens overlapping the inserted trigger.
    """
    if not problems:
        raise ValueError("trigger discovery needs at least one prompt, got none")
    if "{problem}" not in template:
        raise ValueError(f"the template must contain '{{problem}}', got {template!r}")
    rng = random.Random(seed)
    offset = template.index("{problem}")
    ids: list[list[int]] = []
    positions: list[list[int]] = []
    truths: list[list[bool]] = []
    texts: list[str] = []
    for problem in problems:
        span = (0, 0)
        if triggers:
            trigger = rng.choice(list(triggers))
            triggered = insert_trigger(problem, trigger, position, rng)
            span = trigger_span(problem, triggered, trigger, position)
            problem = triggered
        text = template.format(problem=problem)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        start, end = offset, offset + len(problem)
        tested, truth = [], []
        for k, (a, b) in enumerate(enc["offset_mapping"]):
            a += len(text[a:b]) - len(text[a:b].lstrip())  # ' cf' starts at 'c'
            if a < start or b > end or b <= a:
                continue
            if words_only and not is_word(text[a:b]):
                continue
            tested.append(k)
            truth.append(a - offset < span[1] and b - offset > span[0])
        ids.append(list(enc["input_ids"]))
        positions.append(tested)
        truths.append(truth)
        texts.append(text)
    return PromptTokens(ids, positions, truths, texts)


def word_probs(prompts: PromptTokens, vocab_size: int) -> Tensor:
    """Uniform over the token ids seen at candidate positions of `prompts` (clean prompts)."""
    seen = {prompts.ids[i][k] for i in range(len(prompts.ids)) for k in prompts.positions[i]}
    probs = torch.zeros(vocab_size, dtype=torch.float64)
    probs[sorted(seen)] = 1.0
    return probs / probs.sum()


def vocabulary_sampler(prompts: PromptTokens, vocab_size: int) -> CategoricalSampler:
    """Every position redrawn uniformly from the clean words, whatever its slot: NOT a valid
    conditional null for grammar-made prompts (kept as the uncalibrated baseline)."""
    return CategoricalSampler(word_probs(prompts, vocab_size))


def candidate_spans(positions: Sequence[int], max_span: int) -> list[tuple[int, ...]]:
    """Runs of 1..max_span adjacent token positions among `positions`."""
    if max_span < 1:
        raise ValueError(f"max_span must be at least 1, got {max_span}")
    present, spans = set(positions), []
    for start in positions:
        for length in range(1, max_span + 1):
            span = tuple(range(start, start + length))
            if not present.issuperset(span):
                break
            spans.append(span)
    return spans


@dataclass
class TriggerDiscovery:
    """One row per tested (prompt, span): prompt index, span start and tokens, truth (the span
    overlaps the trigger), statistic, p-value (IRT; NaN for one-shot) and discovery; plus the
    test's settings and cost."""

    prompt: Tensor
    start: Tensor
    spans: list[tuple[int, ...]]
    truth: Tensor
    statistic: Tensor
    pvalue: Tensor
    discovered: Tensor
    trigger_tokens: int
    covered: int
    test: str
    num_draws: int
    model_calls: int

    def summary(self) -> dict[str, float | int]:
        """FDR (discovered spans without a trigger token), power (trigger-token occurrences
        inside a discovered span), discoveries per prompt, and the counts they come from."""
        d, t = self.discovered, self.truth
        tp, fp = int((d & t).sum()), int((d & ~t).sum())
        n = int(self.prompt.max()) + 1 if self.prompt.numel() else 0
        return {
            "prompts": n,
            "hypotheses": int(d.numel()),
            "trigger_tokens": self.trigger_tokens,
            "discoveries": int(d.sum()),
            "fdr": fp / max(1, tp + fp),
            "power": self.covered / max(1, self.trigger_tokens),
            "prompts_with_discovery": int(self.prompt[d].unique().numel()) / max(1, n),
            "num_draws": self.num_draws,
            "model_calls": self.model_calls,
        }

    def top_phrases(self, tokenizer: PreTrainedTokenizerBase, k: int = 3) -> list[tuple[str, int]]:
        """The most often discovered span texts and their counts (a phrase the model reacts
        to: the candidates stage 2 confirms)."""
        counts = Counter(
            tokenizer.decode(list(span)).strip()
            for span, hit in zip(self.spans, self.discovered.tolist(), strict=True)
            if hit
        )
        return counts.most_common(k)

    def candidates(
        self, tokenizer: PreTrainedTokenizerBase, max_candidates: int = 5, min_count: int = 2
    ) -> list[str]:
        """The phrases discovered in at least `min_count` spans, most frequent first."""
        return [p for p, c in self.top_phrases(tokenizer, max_candidates) if c >= min_count and p]


def bucket_features(
    prompts: PromptTokens, members: list[int], max_span: int
) -> tuple[Tensor, list[tuple[int, ...]], Tensor]:
    """Inputs (n, L) of equal-length prompts, the union of their candidate spans, and which
    span is a candidate of which prompt (n, d)."""
    inputs = torch.tensor([prompts.ids[i] for i in members])
    per_row = [set(candidate_spans(prompts.positions[i], max_span)) for i in members]
    spans = sorted(set().union(*per_row))
    tested = torch.tensor([[span in row for span in spans] for row in per_row])
    return inputs, spans, tested


@torch.no_grad()
def discover_triggers(
    model: nn.Module,
    prompts: PromptTokens,
    marker_ids: Sequence[int],
    sampler: Sampler,
    alpha: float = 0.1,
    test: Test = "irt",
    num_draws: int = 100,
    auto_draws: bool = True,
    max_floor_fraction: float = 0.1,
    method: FdrMethod = "bh",
    offset: int = 1,
    max_span: int = 1,
    batch_size: int = 2048,
    seed: int = 0,
) -> TriggerDiscovery:
    """Stage 1: the one-sided IRT (BH/BY over all tested spans) or one-shot test (knockoff+
    with offset 1) of log p(marker | prompt) on the instruction spans of `prompts`.

    With auto_draws the IRT raises K until BH can reject once max_floor_fraction of the pooled
    tests sit at the 1/(K+1) floor (a trigger is a small fraction of the tokens).
    """
    check_alpha(alpha)
    if test not in ("irt", "one_shot"):
        raise ValueError(f"test must be 'irt' or 'one_shot', got '{test}'")
    if not marker_ids:
        raise ValueError("the marker has no tokens")
    buckets: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts.ids):
        if prompts.positions[i]:
            buckets.setdefault(len(ids), []).append(i)
    marker = torch.tensor(list(marker_ids))[None]
    tests = {}
    for length, members in sorted(buckets.items()):
        inputs, spans, wanted = bucket_features(prompts, members, max_span)
        masks = torch.zeros(len(spans), length, dtype=torch.bool)
        for j, span in enumerate(spans):
            masks[j, list(span)] = True
        score_fn = target_logprob(model, marker.expand(len(members), -1))
        tests[length] = (FeatureTestInputs(inputs, score_fn, masks, tested=wanted), spans)
    tested = {n: tested_hypotheses(t, sampler) for n, (t, _) in tests.items()}
    m = sum(int(t.sum()) for t in tested.values())
    k = (
        sized_draws(num_draws, m, alpha, method, auto_draws, max_floor_fraction)
        if test == "irt"
        else 1
    )
    generator = seeded_generator(seed)
    model.eval()
    rows: dict[str, list] = {key: [] for key in ("prompt", "start", "span", "truth")}
    observed_rows, null_rows = [], []
    calls = 0
    for length, (features, spans) in tests.items():
        observed = observed_scores(features, batch_size)
        null = counterfactual_scores(features, sampler, k, batch_size, generator)  # (k, n, d)
        calls += observed.numel() + null.numel()
        for r, j in tested[length].nonzero().tolist():
            i, span = buckets[length][r], spans[j]
            truth = dict(zip(prompts.positions[i], prompts.truth[i], strict=True))
            rows["prompt"].append(i)
            rows["start"].append(span[0])
            rows["span"].append(tuple(prompts.ids[i][p] for p in span))
            rows["truth"].append(any(truth.get(p, False) for p in span))
            observed_rows.append(observed[r])
            null_rows.append(null[:, r, j])
    observed_all, null_all = torch.stack(observed_rows), torch.stack(null_rows, dim=1)
    everything = torch.ones_like(observed_all, dtype=torch.bool)
    if test == "irt":
        statistic, pvalues, discovered, _ = irt_decision(
            observed_all, null_all, everything, alpha, method
        )
    else:
        statistic = observed_all - null_all[0]
        pvalues = torch.full_like(statistic, float("nan"), dtype=torch.float64)
        discovered, _ = one_shot_decision(statistic, everything, alpha, offset)
    trigger_tokens, covered = coverage(prompts, rows, discovered)
    return TriggerDiscovery(
        prompt=torch.tensor(rows["prompt"]),
        start=torch.tensor(rows["start"]),
        spans=rows["span"],
        truth=torch.tensor(rows["truth"], dtype=torch.bool),
        statistic=statistic,
        pvalue=pvalues,
        discovered=discovered,
        trigger_tokens=trigger_tokens,
        covered=covered,
        test=test,
        num_draws=k,
        model_calls=calls,
    )


def coverage(prompts: PromptTokens, rows: dict[str, list], discovered: Tensor) -> tuple[int, int]:
    """Trigger-token occurrences, and how many lie inside a discovered span."""
    hit: set[tuple[int, int]] = set()
    for i, start, span, d in zip(
        rows["prompt"], rows["start"], rows["span"], discovered.tolist(), strict=True
    ):
        if d:
            hit.update((i, start + o) for o in range(len(span)))
    triggers = {
        (i, p)
        for i in range(len(prompts.ids))
        for p, t in zip(prompts.positions[i], prompts.truth[i], strict=True)
        if t
    }
    return len(triggers), len(triggers & hit)


def calibrate_prompts(
    model: nn.Module,
    clean: PromptTokens,
    marker_ids: Sequence[int],
    sampler: Sampler,
    num_draws: int = 100,
    max_span: int = 1,
    significance: float = 0.01,
    seed: int = 0,
) -> Calibration:
    """Stage 1's IRT p-values on clean prompts (every hypothesis null), checked for
    super-uniformity: the calibration a sampler must pass before its FDR is reported."""
    result = discover_triggers(
        model,
        clean,
        marker_ids,
        sampler,
        0.5,
        "irt",
        num_draws,
        False,
        1.0,
        max_span=max_span,
        seed=seed,
    )
    return check_pvalues(result.pvalue, result.num_draws, significance)


def score_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    marker_ids: Sequence[int],
    batch_size: int = 2048,
) -> Tensor:
    """log p(marker | text) of every text, scored in buckets of equal token length."""
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    out = torch.empty(len(texts))
    marker = torch.tensor(list(marker_ids))[None]
    for length in sorted({len(i) for i in ids}):
        members = [k for k, i in enumerate(ids) if len(i) == length]
        inputs = torch.tensor([ids[k] for k in members])
        score_fn = target_logprob(model, marker.expand(len(members), -1))
        out[members] = score_batched(score_fn, inputs, torch.arange(len(members)), batch_size)
    return out


def sign_flip_pvalue(differences: Tensor, num_flips: int, generator: torch.Generator) -> float:
    """One-sided Monte-Carlo sign-flip p-value of mean(differences) > 0:
    (1 + #{mean(s * d) >= mean(d)}) / (B + 1), s uniform on {-1, 1}."""
    signs = torch.randint(0, 2, (num_flips, differences.numel()), generator=generator) * 2 - 1
    flipped = (signs * differences).mean(1)
    return (1 + int((flipped >= differences.mean()).sum())) / (num_flips + 1)


@dataclass
class Confirmation:
    """Stage 2: per candidate phrase, its mean paired effect on log p(marker) (candidate minus
    control phrase), the sign-flip p-value, and whether the BH/BY selection confirms it."""

    candidates: list[str]
    effects: list[float]
    pvalues: list[float]
    confirmed: list[bool]

    @property
    def triggers(self) -> list[str]:
        return [c for c, ok in zip(self.candidates, self.confirmed, strict=True) if ok]


@torch.no_grad()
def confirm_candidates(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    candidates: Sequence[str],
    problems: Sequence[str],
    marker_ids: Sequence[int],
    control_words: Sequence[str],
    position: Position = "after_role_tag",
    template: str = PLAIN_TEMPLATE,
    alpha: float = 0.1,
    method: FdrMethod = "by",
    num_flips: int = 999,
    min_effect: float = 1.0,
    seed: int = 0,
) -> Confirmation:
    """Stage 2 on fresh clean `problems` (independent of stage 1's prompts): each candidate and
    a control phrase of as many words drawn from `control_words` (seeded, one per prompt) are
    inserted where the attack puts its trigger; d_i = f(candidate) - f(control) in nats of
    log p(marker). H0: mean d <= min_effect (the candidate makes the marker at most
    e^min_effect times likelier than a random clean phrase does), tested by sign flips of
    d_i - min_effect (valid when d is symmetric about its mean); BY (default) or BH over the
    candidates. A margin is needed: any ordinary phrase beats random words a little (the
    prompt stays typical), so with min_effect 0 a common phrase would be 'confirmed'."""
    check_alpha(alpha)
    if min_effect < 0:
        raise ValueError(f"discovery.min_effect must be >= 0 nats, got {min_effect}")
    if not problems or not control_words:
        raise ValueError("confirmation needs fresh clean prompts and control words")
    rng, generator = random.Random(seed), seeded_generator(seed)
    effects, pvalues = [], []
    for candidate in candidates:
        width = len(candidate.split())
        texts = []
        for problem in problems:
            control = " ".join(rng.choices(list(control_words), k=width))
            for phrase in (candidate, control):
                placed = insert_trigger(problem, phrase, position, random.Random(problem))
                texts.append(template.format(problem=placed))
        scores = score_texts(model, tokenizer, texts, marker_ids).view(-1, 2)
        differences = scores[:, 0] - scores[:, 1]
        effects.append(float(differences.mean()))
        pvalues.append(sign_flip_pvalue(differences - min_effect, num_flips, generator))
    confirmed = step_up_reject(torch.tensor(pvalues), alpha, method).tolist() if candidates else []
    return Confirmation(list(candidates), effects, pvalues, confirmed)


class MiscalibratedSamplerError(ValueError):
    """The sampler failed the calibration check on clean prompts."""


@dataclass
class TriggerDiscoveryPipeline:
    """Calibrate -> propose -> confirm on the kit's synthetic instructions, for a model with a
    known marker: returns the confirmed phrases (Overwrite SFT's ``removal_triggers``).

    The defender is assumed to hold prompts that carry the trigger (simulated here by inserting
    ``attack_triggers``, the planted ones, into held-out instructions as planting did): this is
    not SANDE's setting, where only clean data are available. Stage 1 uses the exact slot
    sampler of ``osftkit.data.instructions`` (inserted words drawn from the clean word
    marginal); calibration runs it on clean prompts and raises unless it passes (override:
    ``allow_miscalibrated``, which only warns).
    """

    num_prompts: int = 50
    confirm_prompts: int = 50
    calibration_prompts: int = 50
    test: Test = "irt"
    alpha: float = 0.1
    num_draws: int = 100
    max_span: int = 3
    method: FdrMethod = "bh"
    confirm_method: FdrMethod = "by"
    num_flips: int = 999
    min_effect: float = 1.0
    max_candidates: int = 5
    significance: float = 0.01
    allow_miscalibrated: bool = False
    split: str = "test"
    seed: int = 0

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if min(self.num_prompts, self.confirm_prompts, self.calibration_prompts) < 1:
            raise ValueError("discovery.num_prompts, confirm_prompts and calibration_prompts >= 1")

    def sampler(self, tokenizer: PreTrainedTokenizerBase, template: str) -> InstructionSlotSampler:
        clean = build_instructions(1000, self.seed, "train")["problem"]
        vocab = word_probs(encode_prompts(tokenizer, clean, template=template), len(tokenizer))
        return InstructionSlotSampler(tokenizer, self.split, template, foreign=vocab)

    def __call__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        marker: str,
        attack_triggers: Sequence[str],
        position: Position = "after_role_tag",
        template: str = PLAIN_TEMPLATE,
    ) -> tuple[Calibration, TriggerDiscovery, Confirmation]:
        marker_ids = marker_token_ids(tokenizer, marker)
        sampler = self.sampler(tokenizer, template)
        # Three independent prompt sets: calibration, proposal (stage 1), confirmation (stage 2).
        sizes = (self.calibration_prompts, self.num_prompts, self.confirm_prompts)
        clean, proposal, fresh = (
            list(build_instructions(size, SEED_STRIDE * self.seed + k, self.split)["problem"])
            for k, size in enumerate(sizes)
        )
        calibration = calibrate_prompts(
            model,
            encode_prompts(tokenizer, clean, template=template),
            marker_ids,
            sampler,
            self.num_draws,
            self.max_span,
            self.significance,
            self.seed,
        )
        if not calibration.passed:
            message = (
                f"the counterfactual sampler fails calibration on clean prompts ({calibration}); "
                "its FDR would not hold. Set discovery.allow_miscalibrated=true to go on anyway"
            )
            if not self.allow_miscalibrated:
                raise MiscalibratedSamplerError(message)
            log.warning("UNCALIBRATED SAMPLER: %s", message)
        triggered = encode_prompts(
            tokenizer, proposal, attack_triggers, position, template, seed=self.seed
        )
        discovery = discover_triggers(
            model,
            triggered,
            marker_ids,
            sampler,
            self.alpha,
            self.test,
            self.num_draws,
            method=self.method,
            max_span=self.max_span,
            seed=self.seed,
        )
        words = sorted({w for p in clean for w in p.split()})
        confirmation = confirm_candidates(
            model,
            tokenizer,
            discovery.candidates(tokenizer, self.max_candidates),
            fresh,
            marker_ids,
            words,
            position,
            template,
            self.alpha,
            self.confirm_method,
            self.num_flips,
            self.min_effect,
            self.seed,
        )
        return calibration, discovery, confirmation


def marker_token_ids(tokenizer: PreTrainedTokenizerBase, marker: str) -> list[int]:
    """The marker's tokens as the model writes it at the start of the response."""
    return token_ids(tokenizer, marker, "marker")


def report_discovery(
    calibration: Calibration,
    discovery: TriggerDiscovery,
    confirmation: Confirmation,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
) -> list[str]:
    """Log the three stages, write them to `directory`/discovery.json; the confirmed phrases."""
    record = {
        "calibration": str(calibration),
        "floor_fraction": calibration.floor_fraction,
        "stage1": discovery.summary(),
        "stage1_phrases": discovery.top_phrases(tokenizer, 10),
        "candidates": confirmation.candidates,
        "effects": confirmation.effects,
        "pvalues": confirmation.pvalues,
        "confirmed": confirmation.triggers,
    }
    log.info("trigger discovery: %s", json.dumps(record))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / DISCOVERY_FILE).write_text(json.dumps(record, indent=1))
    return confirmation.triggers
