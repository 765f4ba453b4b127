"""Trigger discovery: which prompt tokens make a backdoored causal LM emit its marker?

One hypothesis per (prompt i, instruction token j): does log p(marker | prompt_i) depend on
token j beyond a draw from a counterfactual sampler? Removing a trigger token should LOWER
log p(marker), so the statistic is one-sided: T = f(x) - f(x~) with
f = :func:`osftkit.interpret.lm_scores.target_logprob`. The IRT pools the p-values of every
tested token of every prompt into one Benjamini-Hochberg (or -Yekutieli) selection; the
one-shot test pools the statistics into one knockoff(+) threshold.

Only the instruction's tokens are features: the role tags of the template (``Human:``,
``Assistant:``) are never tested, and with ``words_only`` neither are punctuation and whitespace
tokens (the ``.`` that follows an inserted trigger). Prompts of different token lengths are
scored in buckets of equal length (no padding), and in each bucket the counterfactuals of all
tested positions are pooled into batches of ``batch_size`` rows: no Python loop over tokens
calls the model one prompt at a time.

A module would expose this to ``FeatureTestCallback`` by building, for a batch of prompts of
one length, ``FeatureTestInputs(prompt_ids, target_logprob(model, marker_ids), arange(L))``;
this module does the same without the callback, for prompts of any lengths, and reports FDR and
power against the known trigger tokens (and the discovered phrase, a trigger for Overwrite SFT).
"""

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from osftkit.backdoor.poison import Position, insert_trigger, token_ids
from osftkit.interpret.fdr import FdrMethod, bh_reject, check_alpha, knockoff_reject
from osftkit.interpret.lm_scores import target_logprob
from osftkit.interpret.samplers import CategoricalSampler, Sampler
from osftkit.interpret.statistics import irt_pvalues, seeded_generator
from osftkit.interpret.tests import score_batched, sized_draws

PLAIN_TEMPLATE = "Human: {problem}\nAssistant: "


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


def vocabulary_sampler(prompts: PromptTokens, vocab_size: int) -> CategoricalSampler:
    """Uniform over the token ids seen at tested positions of `prompts` (use clean prompts)."""
    seen = {prompts.ids[i][k] for i in range(len(prompts.ids)) for k in prompts.positions[i]}
    probs = torch.zeros(vocab_size, dtype=torch.float64)
    probs[sorted(seen)] = 1.0
    return CategoricalSampler(probs / probs.sum())


@dataclass
class TriggerDiscovery:
    """One row per tested (prompt, token): prompt index, position, token id, truth, statistic,
    p-value (IRT; NaN for one-shot) and discovery; plus the test's settings and cost."""

    prompt: Tensor
    position: Tensor
    token: Tensor
    truth: Tensor
    statistic: Tensor
    pvalue: Tensor
    discovered: Tensor
    test: str
    num_draws: int
    model_calls: int

    def summary(self) -> dict[str, float | int]:
        """FDR (discoveries that are not trigger tokens), power (trigger-token occurrences
        discovered), discoveries per prompt, and the counts they come from."""
        d, t = self.discovered, self.truth
        tp, fp = int((d & t).sum()), int((d & ~t).sum())
        n = int(self.prompt.max()) + 1 if self.prompt.numel() else 0
        prompts_with = int(self.prompt[d].unique().numel())
        return {
            "prompts": n,
            "hypotheses": int(d.numel()),
            "trigger_tokens": int(t.sum()),
            "discoveries": int(d.sum()),
            "fdr": fp / max(1, tp + fp),
            "power": tp / max(1, int(t.sum())),
            "prompts_with_discovery": prompts_with / max(1, n),
            "num_draws": self.num_draws,
            "model_calls": self.model_calls,
        }

    def top_tokens(self, tokenizer: PreTrainedTokenizerBase, k: int = 5) -> list[tuple[str, int]]:
        """The most often discovered token strings."""
        counts = Counter(int(i) for i in self.token[self.discovered])
        return [(tokenizer.decode([i]), c) for i, c in counts.most_common(k)]

    def trigger_candidate(self, tokenizer: PreTrainedTokenizerBase, min_share: float = 0.05) -> str:
        """The discovered tokens found at least min_share as often as the most discovered one,
        in their usual order in the prompt (median position): the trigger to hand to Overwrite
        SFT (``method.backdoor.triggers``) when none is known."""
        tokens = self.token[self.discovered]
        if tokens.numel() == 0:
            return ""
        ids, counts = tokens.unique(return_counts=True)
        keep = ids[counts >= min_share * counts.max()]
        order = sorted(
            keep.tolist(),
            key=lambda t: self.position[self.discovered & (self.token == t)].float().median(),
        )
        return tokenizer.decode(order).strip()

    def top_phrases(self, tokenizer: PreTrainedTokenizerBase, k: int = 3) -> list[tuple[str, int]]:
        """The most often discovered runs of adjacent tokens: a trigger candidate (a phrase the
        model was trained to react to), e.g. for ``method=overwrite`` when none is known."""
        counts: Counter[tuple[int, ...]] = Counter()
        for i in self.prompt[self.discovered].unique().tolist():
            rows = (self.prompt == i) & self.discovered
            pos, tok = self.position[rows].tolist(), self.token[rows].tolist()
            run = [tok[0]]
            for a, b, t in zip(pos, pos[1:], tok[1:], strict=False):
                if b == a + 1:
                    run.append(t)
                else:
                    counts[tuple(run)] += 1
                    run = [t]
            counts[tuple(run)] += 1
        return [(tokenizer.decode(list(p)).strip(), c) for p, c in counts.most_common(k)]


def bucket_scores(
    model: nn.Module,
    prompts: list[list[int]],
    positions: list[list[int]],
    marker: Tensor,
    sampler: Sampler,
    num_draws: int,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[Tensor, dict[int, Tensor], int]:
    """Observed scores (n,) of equal-length prompts, per tested position the scores of
    num_draws counterfactuals (num_draws, n) (rows of all positions pooled into full batches),
    and how many draws changed their token."""
    inputs = torch.tensor(prompts)
    n, length = inputs.shape
    score_fn = target_logprob(model, marker.expand(n, -1))
    observed = score_batched(score_fn, inputs, torch.arange(n), batch_size)
    columns = sorted({k for p in positions for k in p})
    instance = torch.arange(n).repeat(num_draws)
    pending: list[Tensor] = []
    scores: list[Tensor] = []
    moved = 0
    for j, pos in enumerate(columns):
        mask = torch.zeros(length, dtype=torch.bool)
        mask[pos] = True
        draws = sampler.sample(inputs, mask, num_draws, generator)
        if draws.shape != (num_draws, n, length):
            raise ValueError(f"sampler returned shape {tuple(draws.shape)} for position {pos}")
        moved += int((draws[:, :, pos] != inputs[:, pos]).sum())
        pending.append(draws.flatten(0, 1))
        if len(pending) * len(instance) >= batch_size or j == len(columns) - 1:
            rows = torch.cat(pending)
            scores.append(score_batched(score_fn, rows, instance.repeat(len(pending)), batch_size))
            pending = []
    flat = torch.cat(scores).view(len(columns), num_draws, n)
    return observed, {pos: flat[c] for c, pos in enumerate(columns)}, moved


@torch.no_grad()
def discover_triggers(
    model: nn.Module,
    prompts: PromptTokens,
    marker_ids: Sequence[int],
    sampler: Sampler,
    alpha: float = 0.1,
    test: str = "irt",
    num_draws: int = 100,
    auto_draws: bool = True,
    max_floor_fraction: float = 0.1,
    method: FdrMethod = "bh",
    offset: int = 1,
    batch_size: int = 2048,
    seed: int = 0,
) -> TriggerDiscovery:
    """The one-sided IRT (BH over all tested tokens) or one-shot test (knockoff+ with offset 1)
    of log p(marker | prompt) on the instruction tokens of `prompts`.

    With auto_draws the IRT raises K until BH can reject once max_floor_fraction of the pooled
    tests sit at the 1/(K+1) floor (a trigger is a small fraction of the tokens).
    """
    check_alpha(alpha)
    if test not in ("irt", "one_shot"):
        raise ValueError(f"test must be 'irt' or 'one_shot', got '{test}'")
    if not marker_ids:
        raise ValueError("the marker has no tokens")
    m = prompts.num_hypotheses
    if test == "irt":
        k = sized_draws(num_draws, m, alpha, method, auto_draws, max_floor_fraction)
    else:
        k = 1
    generator = seeded_generator(seed)
    marker = torch.tensor(list(marker_ids))[None]
    buckets: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts.ids):
        if prompts.positions[i]:
            buckets.setdefault(len(ids), []).append(i)
    rows: dict[str, list] = {key: [] for key in ("prompt", "position", "token", "truth")}
    observed_rows, null_rows = [], []
    calls = moved = 0
    model.eval()
    for length in sorted(buckets):
        members = buckets[length]
        observed, null, changed = bucket_scores(
            model,
            [prompts.ids[i] for i in members],
            [prompts.positions[i] for i in members],
            marker,
            sampler,
            k,
            batch_size,
            generator,
        )
        calls += len(members) * (1 + k * len(null))
        moved += changed
        for r, i in enumerate(members):
            for pos, truth in zip(prompts.positions[i], prompts.truth[i], strict=True):
                rows["prompt"].append(i)
                rows["position"].append(pos)
                rows["token"].append(prompts.ids[i][pos])
                rows["truth"].append(truth)
                observed_rows.append(observed[r])
                null_rows.append(null[pos][:, r])
    if moved == 0:
        raise ValueError(
            "the sampler returned the original token in every draw: it must replace the token"
        )
    observed_all = torch.stack(observed_rows)
    null_all = torch.stack(null_rows, dim=1)  # (k, m)
    if test == "irt":
        pvalues = irt_pvalues(observed_all, null_all)
        discovered = bh_reject(pvalues, alpha, method)
        statistic = observed_all - null_all.mean(0)
    else:
        statistic = observed_all - null_all[0]
        pvalues = torch.full_like(statistic, float("nan"), dtype=torch.float64)
        discovered = knockoff_reject(statistic, alpha, offset)
    return TriggerDiscovery(
        prompt=torch.tensor(rows["prompt"]),
        position=torch.tensor(rows["position"]),
        token=torch.tensor(rows["token"]),
        truth=torch.tensor(rows["truth"], dtype=torch.bool),
        statistic=statistic,
        pvalue=pvalues,
        discovered=discovered,
        test=test,
        num_draws=k,
        model_calls=calls,
    )


def marker_token_ids(tokenizer: PreTrainedTokenizerBase, marker: str) -> list[int]:
    """The marker's tokens as the model writes it at the start of the response."""
    return token_ids(tokenizer, marker, "marker")
