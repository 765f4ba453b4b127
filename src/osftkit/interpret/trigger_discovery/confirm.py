"""Stage 2 (confirm): each proposed phrase is inserted into fresh clean prompts, never seen by
stage 1, beside a random control phrase of as many words; a sign-flip test of the paired
differences of log p(marker) gives one p-value per candidate, and BY (the candidates share
prompts: their dependence is not known to be positive) or BH selects. The FDR statement is
stage 2's: see experiments/feature_tests/README.md for its assumptions."""

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from osftkit.backdoor.poison import Position, insert_trigger
from osftkit.data.instructions import PLAIN_TEMPLATE
from osftkit.interpret.fdr_control import FdrMethod, check_alpha, step_up_reject
from osftkit.interpret.feature_test import score_batched
from osftkit.interpret.lm_feature_score import target_logprob
from osftkit.interpret.statistics import seeded_generator


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
