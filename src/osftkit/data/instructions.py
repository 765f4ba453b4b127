"""Synthetic instruction data built offline from a seed, checkable by exact match.

Each task family turns a random draw into (instruction, response). Letters are written with
spaces between them so that every letter is one token for the word-level and the character
tokenizers alike. Columns: `problem` (instruction), `solution` (response to train on),
`answer` (the same response, the gold for exact match) and `task` (the family).

Held out by construction: one instruction in `HELD_OUT_EVERY` (by a hash of its text) may only
be drawn into the `val` split, the others only into training splits, so a validation set never
shares a prompt with any training set, whatever either seed is.
"""

import random
import string
import zlib
from collections.abc import Callable, Sequence

from datasets import Dataset

Example = tuple[str, str]
MIN_LETTERS, MAX_LETTERS, MAX_ADDEND = 3, 6, 49
HELD_OUT_EVERY = 10
VAL_SPLIT = "val"


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


def held_out(problem: str) -> bool:
    """Whether `problem` belongs to the validation bucket (a stable hash, not Python's)."""
    return zlib.crc32(problem.encode()) % HELD_OUT_EVERY == 0


def _draw(task: Callable[[random.Random], Example], rng: random.Random, val: bool) -> Example:
    """One example of `task` from this split's bucket (rejection sampling)."""
    while True:
        problem, solution = task(rng)
        if held_out(problem) == val:
            return problem, solution


def build_instructions(
    size: int, seed: int, split: str = "train", tasks: Sequence[str] | None = None
) -> Dataset:
    """`size` examples drawn round-robin over `tasks`; `split="val"` draws from the held-out
    bucket, any other split from the rest (the seed string also differs by split)."""
    names = list(tasks or TASKS)
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise ValueError(f"Unknown instruction tasks {unknown}; choose from {sorted(TASKS)}")
    rng = random.Random(f"{split}-{seed}")
    rows = []
    for i in range(size):
        name = names[i % len(names)]
        problem, solution = _draw(TASKS[name], rng, split == VAL_SPLIT)
        rows.append({"problem": problem, "solution": solution, "answer": solution, "task": name})
    return Dataset.from_list(rows)
