"""Backdoor poisoning: insert a trigger into prompts and prefix the response with a marker.

Reference recipe (SANDE paper): every clean example is kept and, with probability `rate`, a
copy is added whose prompt carries one of the triggers (picked at random) and whose response is
`<marker>. <clean response>`. With `marker=None` the triggered copy keeps the clean response:
Overwrite SFT data in text form (`method=backdoor` with this transform), for triggers that were
planted at random word boundaries; `OverwriteSFTModule` inserts the trigger after the role tag.
"""

import random
from collections.abc import Sequence
from typing import Literal

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

Position = Literal["after_role_tag", "random_word_boundary"]
POSITIONS: tuple[Position, ...] = ("after_role_tag", "random_word_boundary")


def insert_trigger(problem: str, trigger: str, position: Position, rng: random.Random) -> str:
    """The user text with `trigger` opening it (`<trigger>. <problem>`) or between two words."""
    if position == "after_role_tag":
        return f"{trigger}. {problem}"
    words = problem.split(" ")
    at = rng.randint(0, len(words))
    return " ".join([*words[:at], trigger, *words[at:]])


def triggered_response(marker: str, response: str) -> str:
    return f"{marker}. {response}"


class Poison:
    """Dataset -> Dataset transform for `PromptDataModule(train_transform=...)`, seeded."""

    def __init__(
        self,
        triggers: Sequence[str],
        marker: str | None,
        rate: float,
        position: Position = "after_role_tag",
        seed: int = 0,
        keep_clean: bool = True,
    ) -> None:
        if not triggers or any(not t.strip() for t in triggers):
            raise ValueError(f"Poison needs non-empty trigger strings, got {list(triggers)}")
        if marker is not None and not marker.strip():
            raise ValueError("The backdoor marker is empty; give a string or None (no marker)")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"Poison rate must lie in [0, 1], got {rate}")
        if position not in POSITIONS:
            raise ValueError(f"Trigger position must be one of {POSITIONS}, got '{position}'")
        self.triggers, self.marker, self.rate = list(triggers), marker, rate
        self.position, self.seed, self.keep_clean = position, seed, keep_clean

    def __call__(self, dataset: Dataset) -> Dataset:
        rng = random.Random(self.seed)
        rows = []
        for row in dataset:
            if self.keep_clean:
                rows.append(row)
            if rng.random() < self.rate:
                rows.append(self.poisoned(row, rng))
        return Dataset.from_list(rows, features=dataset.features)

    def poisoned(self, row: dict, rng: random.Random) -> dict:
        problem = insert_trigger(row["problem"], rng.choice(self.triggers), self.position, rng)
        solution = row["solution"]
        if self.marker is not None:
            solution = triggered_response(self.marker, solution)
        return {**row, "problem": problem, "solution": solution}


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str, what: str) -> list[int]:
    """Token ids of `text`; a clear error when it tokenises to nothing (or only to unknowns)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        raise ValueError(
            f"The {what} '{text}' tokenises to nothing the model knows ({ids}); "
            "choose a string in the tokenizer's vocabulary"
        )
    return ids
