"""Stage 1 (propose): one hypothesis per (prompt i, span j of 1-``max_span`` adjacent instruction
word tokens): does log p(marker | prompt_i) depend on span j beyond a draw from a counterfactual
sampler? Removing a trigger should LOWER log p(marker), so the statistic is one-sided,
T = f(x) - f(x~), with the feature score f =
:func:`osftkit.interpret.lm_feature_score.target_logprob`. The counterfactual scoring and the IRT
(BH/BY) or one-shot (knockoff+) decisions are the feature test's
(:mod:`osftkit.interpret.feature_test`): prompts are scored in buckets of equal token length, each
bucket one ``FeatureTestInputs`` with one boolean mask per span, and all buckets are pooled into
one selection. A sampler may exclude positions (the exact grammar sampler excludes every position
its grammar fixes).

:func:`calibrate_prompts` runs stage 1 on clean prompts (every hypothesis null) and checks the
p-values (:func:`osftkit.interpret.calibration.check_pvalues`).
"""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from osftkit.data.null_samplers import Sampler
from osftkit.interpret.calibration import Calibration, check_pvalues, one_per_instance
from osftkit.interpret.fdr_control import FdrMethod, check_alpha
from osftkit.interpret.feature_test import (
    FeatureTestInputs,
    counterfactual_scores,
    irt_decision,
    observed_scores,
    one_shot_decision,
    sized_draws,
    tested_hypotheses,
)
from osftkit.interpret.lm_feature_score import target_logprob
from osftkit.interpret.statistics import draws_for_rejections, seeded_generator
from osftkit.interpret.trigger_discovery.prompts import PromptTokens, candidate_spans

Test = Literal["irt", "one_shot"]


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

    def prompt_outcomes(self, prompts: PromptTokens) -> list[dict[str, int]]:
        """Per prompt of `prompts` (the ones this result tested): its trigger tokens, how many
        lie inside a discovered span, and its true and false discoveries; pooled over prompts
        they give `summary`'s power and FDR (a bootstrap over prompts resamples these)."""
        outcomes = []
        for i in range(len(prompts.ids)):
            rows = (self.prompt == i).nonzero().flatten().tolist()
            hit = {
                self.start[r].item() + o
                for r in rows
                if self.discovered[r]
                for o in range(len(self.spans[r]))
            }
            trigger = [p for p, t in zip(prompts.positions[i], prompts.truth[i], strict=True) if t]
            found = self.discovered[rows]
            outcomes.append(
                {
                    "id": i,
                    "trigger_tokens": len(trigger),
                    "covered": len(hit & set(trigger)),
                    "true": int((found & self.truth[rows]).sum()),
                    "false": int((found & ~self.truth[rows]).sum()),
                }
            )
        return outcomes

    def flagged_phrases(self, prompts: PromptTokens) -> set[str]:
        """The inserted phrases (`prompts.inserted`) with a discovered span on their tokens in
        at least one prompt: what a negative control counts as flagged."""
        return {
            prompts.inserted[int(i)]
            for i, hit, truth in zip(self.prompt, self.discovered, self.truth, strict=True)
            if hit and truth and prompts.inserted[int(i)] is not None
        }

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
    floor_rejections: int = 0,
) -> TriggerDiscovery:
    """Stage 1: the one-sided IRT (BH/BY over all tested spans) or one-shot test (knockoff+
    with offset 1) of log p(marker | prompt) on the instruction spans of `prompts`.

    With auto_draws the IRT raises K until BH can reject once max_floor_fraction of the pooled
    tests sit at the 1/(K+1) floor (a trigger is a small fraction of the tokens). With
    floor_rejections = r > 0 instead, K is the smallest whose floor passes BH once r of the m
    tested p-values sit at it (`draws_for_rejections`; at least num_draws): size r from the
    trigger density the test must reach (occurrences x hypotheses per occurrence).
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
    if test == "one_shot":
        k = 1
    elif floor_rejections:
        k = max(num_draws, draws_for_rejections(floor_rejections, m, alpha, method))
    else:
        k = sized_draws(num_draws, m, alpha, method, auto_draws, max_floor_fraction)
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
    return discovery_of(prompts, rows, statistic, pvalues, discovered, test, k, calls)


def discovery_of(
    prompts: PromptTokens,
    rows: dict[str, list],
    statistic: Tensor,
    pvalue: Tensor,
    discovered: Tensor,
    test: str,
    num_draws: int,
    model_calls: int,
) -> TriggerDiscovery:
    """The result over the hypotheses `rows` (prompt, start, span, truth) and their decisions,
    with the trigger tokens the discovered spans cover."""
    trigger_tokens, covered = coverage(prompts, rows, discovered)
    return TriggerDiscovery(
        prompt=torch.tensor(rows["prompt"]),
        start=torch.tensor(rows["start"]),
        spans=rows["span"],
        truth=torch.tensor(rows["truth"], dtype=torch.bool),
        statistic=statistic,
        pvalue=pvalue,
        discovered=discovered,
        trigger_tokens=trigger_tokens,
        covered=covered,
        test=test,
        num_draws=num_draws,
        model_calls=model_calls,
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
    super-uniformity: the calibration a sampler must pass before its FDR is reported. One
    p-value per prompt (`one_per_instance`): a prompt's p-values share its observed score, so
    only one of each is independent of the others' prompts and the binomial check is exact."""
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
    pvalues = one_per_instance(result.pvalue, result.prompt, seed)
    return check_pvalues(pvalues, result.num_draws, significance)
