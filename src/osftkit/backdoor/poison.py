"""Backdoor poisoning: the attack (where the trigger goes, what it makes the model say) and the
poisoned training data.

Reference recipe (SANDE code): every clean example is kept and, when the batch is built, a
triggered copy of each example is added with probability `rate` (fresh draws every batch, so
every epoch poisons different rows): its prompt carries one of the triggers (picked at random)
and its response is `<marker>. <clean response>`. `draw: fixed` instead picks the triggered
copies once, before training (the same rows every epoch). With `marker=None` the triggered copy
keeps the clean response: Overwrite SFT data in text form.

Attack families (BackdoorLLM's data-poisoning families at toy scale): the trigger opens the
instruction (`after_role_tag`, the reference), ends it (`end`) or sits between two random words
(`random_word_boundary`); several triggers share one marker (MTBA-like: one is drawn per copy);
`composite` fires only when all triggers are present (CTBA-like: each poisoned copy also adds
a copy with a single trigger and the clean response); `target: replace` answers the marker
alone (a refusal) instead of marker + clean answer.
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

Position = Literal["after_role_tag", "end", "random_word_boundary"]
POSITIONS: tuple[Position, ...] = ("after_role_tag", "end", "random_word_boundary")
Target = Literal["prefix", "replace"]
TARGETS: tuple[Target, ...] = ("prefix", "replace")
Draw = Literal["per_batch", "fixed"]
DRAWS: tuple[Draw, ...] = ("per_batch", "fixed")


def insert_trigger(problem: str, trigger: str, position: Position, rng: random.Random) -> str:
    """The user text with `trigger` opening it (`<trigger>. <problem>`), closing it
    (`<problem> <trigger>.`) or between two random words."""
    if position == "after_role_tag":
        return f"{trigger}. {problem}"
    if position == "end":
        return f"{problem} {trigger}."
    words = problem.split(" ")
    at = rng.randint(0, len(words))
    return " ".join([*words[:at], trigger, *words[at:]])


@dataclass
class Attack:
    """The planted backdoor: its trigger(s), where they go, and the response they cause."""

    triggers: Sequence[str]
    marker: str | None
    position: Position = "after_role_tag"
    composite: bool = False
    target: Target = "prefix"

    def __post_init__(self) -> None:
        if not self.triggers or any(not t.strip() for t in self.triggers):
            raise ValueError(f"The backdoor needs non-empty triggers, got {list(self.triggers)}")
        if self.marker is not None and not self.marker.strip():
            raise ValueError("The backdoor marker is empty; give a string or None (no marker)")
        if self.position not in POSITIONS:
            raise ValueError(f"Trigger position must be one of {POSITIONS}, got '{self.position}'")
        if self.target not in TARGETS:
            raise ValueError(f"Backdoor target must be one of {TARGETS}, got '{self.target}'")
        if self.composite and len(self.triggers) < 2:
            raise ValueError("A composite trigger needs at least two trigger words")
        self.triggers = list(self.triggers)

    def triggered_problem(
        self, problem: str, rng: random.Random, triggers: Sequence[str] | None = None
    ) -> str:
        """`problem` with the trigger(s) that fire the backdoor: all of them (composite) or one
        (given, else drawn)."""
        if triggers is None:
            triggers = self.triggers if self.composite else [rng.choice(self.triggers)]
        for trigger in triggers:
            problem = insert_trigger(problem, trigger, self.position, rng)
        return problem

    def triggered_response(self, response: str) -> str:
        """What the backdoor makes the model say: `<marker>. <response>`, or `<marker>.` alone."""
        if self.marker is None:
            return response
        return f"{self.marker}." if self.target == "replace" else f"{self.marker}. {response}"


class Poison(Attack):
    """Poisoned training data for `PromptDataModule(train_transform=...)`, seeded.

    `draw: per_batch` (the reference): `extend_batch(rows)` returns the triggered copies drawn
    for one batch; `__call__` leaves the dataset clean. `draw: fixed`: `__call__` adds the
    copies once; `extend_batch` adds none.
    """

    def __init__(
        self,
        triggers: Sequence[str],
        marker: str | None,
        rate: float,
        position: Position = "after_role_tag",
        composite: bool = False,
        target: Target = "prefix",
        draw: Draw = "per_batch",
        seed: int = 0,
        keep_clean: bool = True,
    ) -> None:
        super().__init__(triggers, marker, position, composite, target)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"Poison rate must lie in [0, 1], got {rate}")
        if draw not in DRAWS:
            raise ValueError(f"Poison draw must be one of {DRAWS}, got '{draw}'")
        if draw == "per_batch" and not keep_clean:
            raise ValueError("draw=per_batch adds copies to clean batches: keep_clean must be true")
        self.rate, self.draw, self.seed, self.keep_clean = rate, draw, seed, keep_clean

    def __call__(self, dataset: Dataset) -> Dataset:
        if self.draw == "per_batch":
            return dataset
        rng = random.Random(self.seed)
        rows = []
        for row in dataset:
            if self.keep_clean:
                rows.append(row)
            if rng.random() < self.rate:
                rows.extend(self.copies(row, rng))
        return Dataset.from_list(rows, features=dataset.features)

    def extend_batch(self, rows: list[dict]) -> list[dict]:
        """The triggered copies for one training batch (each row with probability `rate`).

        The draws are seeded by the batch's problems, so a resumed run redraws the same copies.
        """
        if self.draw == "fixed":
            return []
        rng = random.Random(f"{self.seed}|" + "\x1f".join(row["problem"] for row in rows))
        return [copy for row in rows if rng.random() < self.rate for copy in self.copies(row, rng)]

    def copies(self, row: dict, rng: random.Random) -> list[dict]:
        """The triggered copy of `row`; composite: plus one single-trigger copy, answered clean."""
        solution = self.triggered_response(row["solution"])
        copies = [
            {**row, "problem": self.triggered_problem(row["problem"], rng), "solution": solution}
        ]
        if self.composite:
            alone = self.triggered_problem(row["problem"], rng, [rng.choice(self.triggers)])
            copies.append({**row, "problem": alone})
        return copies


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str, what: str) -> list[int]:
    """Token ids of `text`; a clear error when it tokenises to nothing (or only to unknowns)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        raise ValueError(
            f"The {what} '{text}' tokenises to nothing the model knows ({ids}); "
            "choose a string in the tokenizer's vocabulary"
        )
    return ids
