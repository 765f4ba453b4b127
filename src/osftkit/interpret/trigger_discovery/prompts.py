"""The prompts trigger discovery tests: tokenised instructions (with a trigger inserted, when
given), the positions to test in each (the instruction's word tokens: role tags, whitespace and
the ``.`` after an inserted trigger never are), their candidate spans, and the marker's tokens."""

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from osftkit.backdoor.poison import Position, insert_trigger, token_ids
from osftkit.data.instructions import PLAIN_TEMPLATE
from osftkit.data.null_samplers import CategoricalSampler


@dataclass
class PromptTokens:
    """Tokenised prompts, the positions to test in each, which of them are trigger tokens, and
    the phrase inserted into each prompt (None: none)."""

    ids: list[list[int]]
    positions: list[list[int]]
    truth: list[list[bool]]
    texts: list[str]
    inserted: list[str | None]

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


def insertion_plan(
    num_prompts: int, phrases: Sequence[str], density: float, rng: random.Random
) -> list[str | None]:
    """Which phrase each of `num_prompts` prompts carries (None: none): round(density * n)
    prompts chosen at random, the phrases dealt to them in a shuffled cycle (each phrase as
    often as the others, to within one)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"the trigger density must lie in (0, 1], got {density}")
    carriers = round(density * num_prompts)
    if carriers == 0:
        raise ValueError(f"density {density} of {num_prompts} prompts puts no phrase anywhere")
    order = list(phrases)
    rng.shuffle(order)
    plan: list[str | None] = [None] * num_prompts
    for k, i in enumerate(sorted(rng.sample(range(num_prompts), carriers))):
        plan[i] = order[k % len(order)]
    return plan


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[str],
    triggers: Sequence[str] | None = None,
    position: Position = "after_role_tag",
    template: str = PLAIN_TEMPLATE,
    words_only: bool = True,
    seed: int = 0,
    density: float = 1.0,
) -> PromptTokens:
    """Prompts from instructions; with `triggers`, a share `density` of them (seeded) carries
    one (`insertion_plan`: every trigger as often as the others, to within one).

    The tested positions are the tokens inside the instruction's character span (the template's
    role tags lie outside it); the truth marks tokens overlapping the inserted trigger.
    """
    if not problems:
        raise ValueError("trigger discovery needs at least one prompt, got none")
    if "{problem}" not in template:
        raise ValueError(f"the template must contain '{{problem}}', got {template!r}")
    rng = random.Random(seed)
    plan = insertion_plan(len(problems), triggers, density, rng) if triggers else []
    offset = template.index("{problem}")
    ids: list[list[int]] = []
    positions: list[list[int]] = []
    truths: list[list[bool]] = []
    texts: list[str] = []
    for i, problem in enumerate(problems):
        span = (0, 0)
        if plan and plan[i] is not None:
            trigger = plan[i]
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
    return PromptTokens(ids, positions, truths, texts, plan or [None] * len(problems))


def random_phrases(words: Sequence[str], num: int, max_words: int, rng: random.Random) -> list[str]:
    """`num` phrases of 1..max_words words drawn uniformly from `words` (null insertions)."""
    if not words or max_words < 1:
        raise ValueError("random phrases need words and max_words >= 1")
    return [" ".join(rng.choices(list(words), k=rng.randint(1, max_words))) for _ in range(num)]


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


def marker_token_ids(tokenizer: PreTrainedTokenizerBase, marker: str) -> list[int]:
    """The marker's tokens as the model writes it at the start of the response."""
    return token_ids(tokenizer, marker, "marker")
