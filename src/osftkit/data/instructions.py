"""Synthetic instruction data built offline from a seed, checkable by exact match.

Each task family turns a random draw into (instruction, response). Letters are written with
spaces between them so that every letter is one token for the word-level and the character
tokenizers alike. Columns: `problem` (instruction), `solution` (response to train on),
`answer` (the same response, the gold for exact match) and `task` (the family).
"""

import random
import string
from collections.abc import Callable, Sequence

from datasets import Dataset

Example = tuple[str, str]
MIN_LETTERS, MAX_LETTERS, MAX_ADDEND = 3, 6, 49


def _letters(rng: random.Random) -> list[str]:
    return rng.choices(string.ascii_lowercase, k=rng.randint(MIN_LETTERS, MAX_LETTERS))


def _reverse(rng: random.Random) -> Example:
    letters = _letters(rng)
    return f"reverse the letters {' '.join(letters)}", " ".join(reversed(letters))


def _sort(rng: random.Random) -> Example:
    letters = _letters(rng)
    return f"sort the letters {' '.join(letters)}", " ".join(sorted(letters))


def _capitalise(rng: random.Random) -> Example:
    letters = " ".join(_letters(rng))
    return f"capitalise the letters {letters}", letters.upper()


def _count(rng: random.Random) -> Example:
    letters = _letters(rng)
    return f"count the letters {' '.join(letters)}", str(len(letters))


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, MAX_ADDEND), rng.randint(0, MAX_ADDEND)
    return f"add {a} and {b}", str(a + b)


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "reverse": _reverse,
    "sort": _sort,
    "capitalise": _capitalise,
    "count": _count,
    "add": _add,
}


def build_instructions(
    size: int, seed: int, split: str = "train", tasks: Sequence[str] | None = None
) -> Dataset:
    """`size` examples drawn round-robin over `tasks`; train and val differ through `split`."""
    names = list(tasks or TASKS)
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise ValueError(f"Unknown instruction tasks {unknown}; choose from {sorted(TASKS)}")
    rng = random.Random(f"{split}-{seed}")
    rows = []
    for i in range(size):
        name = names[i % len(names)]
        problem, solution = TASKS[name](rng)
        rows.append({"problem": problem, "solution": solution, "answer": solution, "task": name})
    return Dataset.from_list(rows)
