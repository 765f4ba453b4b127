"""Synthetic instruction data built offline from a seed, checkable by exact match.

Each task family turns a random draw into (instruction, response). Letters are written with
spaces between them so that every letter is one token for the word-level and the character
tokenizers alike. Columns: `problem` (instruction), `solution` (response to train on),
`answer` (the same response, the gold for exact match) and `task` (the family).

Held out by construction: one instruction in `HELD_OUT_EVERY` (by a hash of its text) may only
be drawn into the `val` split, the others only into training splits, so a validation set never
shares a prompt with any training set, whatever either seed is.

The generator's slot grammar (`instruction_slots`) is public: `InstructionSlotSampler` redraws a
prompt token from exactly the distribution the generator drew it from, the calibrated null of
the feature tests on these prompts (trigger discovery).
"""

import random
import re
import string
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from osftkit.data.null_samplers import fill, token_positions

Example = tuple[str, str]
MIN_LETTERS, MAX_LETTERS, MAX_ADDEND = 3, 6, 49
HELD_OUT_EVERY = 10
VAL_SPLIT = "val"
DEV_SPLIT = "dev"  # held out too, disjoint from the test prompts: for choices


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
    size: int,
    seed: int,
    split: str = "train",
    tasks: Sequence[str] | None = None,
    test_size: int = 200,
) -> Dataset:
    """`size` examples drawn round-robin over `tasks`; `split="val"` draws from the held-out
    bucket, `split="dev"` too but never one of the test set (the first `test_size` of the `val`
    split at seed 0, the prompts every study reports on), any other split from the rest (the
    seed string also differs by split)."""
    names = list(tasks or TASKS)
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise ValueError(f"Unknown instruction tasks {unknown}; choose from {sorted(TASKS)}")
    # A val draw is prefix-stable, so this also avoids any smaller test set of seed 0.
    test = (
        set(build_instructions(test_size, 0, VAL_SPLIT, tasks)["problem"])
        if split == DEV_SPLIT and test_size > 0
        else set()
    )
    rng = random.Random(f"{split}-{seed}")
    rows = []
    while len(rows) < size:
        name = names[len(rows) % len(names)]
        problem, solution = _draw(TASKS[name], rng, split in (VAL_SPLIT, DEV_SPLIT))
        if problem not in test:
            rows.append(
                {"problem": problem, "solution": solution, "answer": solution, "task": name}
            )
    return Dataset.from_list(rows)


# ---- the slot grammar: what the generator draws, for an exact conditional null -------------
PLAIN_TEMPLATE = "Human: {problem}\nAssistant: "
LETTERS = tuple(string.ascii_lowercase)
ADDENDS = tuple(str(v) for v in range(MAX_ADDEND + 1))
_LETTER_TASKS = "|".join(name for name in TASKS if name != "add")
LETTER_PATTERN = re.compile(
    rf"\b(?:{_LETTER_TASKS}) the letters "
    rf"(?P<letters>(?:[a-z] ){{{MIN_LETTERS - 1},{MAX_LETTERS - 1}}}[a-z])\b"
)
ADD_PATTERN = re.compile(r"\badd (?P<a>\d+) and (?P<b>\d+)\b")


@dataclass(frozen=True)
class Slot:
    """Characters [start, end) of a text that the generator filled by a uniform draw of values."""

    start: int
    end: int
    values: tuple[str, ...]


def instruction_slots(text: str) -> tuple[tuple[int, int], list[Slot]] | None:
    """The instruction inside `text` (its character span) and its slots, or None if no task's
    grammar matches. Everything else of the instruction (task words, spacing) is fixed."""
    if match := LETTER_PATTERN.search(text):
        start = match.start("letters")
        slots = [
            Slot(start + k, start + k + 1, LETTERS) for k in range(0, len(match["letters"]), 2)
        ]
        return match.span(), slots
    if match := ADD_PATTERN.search(text):
        return match.span(), [Slot(*match.span(g), ADDENDS) for g in ("a", "b")]
    return None


@dataclass
class ParsedPrompt:
    """One tokenised prompt: its text, instruction span, and per token position its slot index
    (or -1: fixed by the grammar) and whether it is a word outside the instruction (foreign)."""

    text: str
    instruction: tuple[int, int]
    slots: list[Slot]
    slot_of: list[int]
    foreign: list[bool]
    candidates: dict[tuple[int, tuple[int, ...]], tuple[list[str], Tensor]] = field(
        default_factory=dict
    )


class InstructionSlotSampler:
    """The exact conditional null P(x_j | x_-j) of this module's synthetic instructions, on
    token ids of prompts formatted with `template`.

    Letters and addends are uniform draws of the generator; a feature (one token or a span)
    is redrawn from every slot value whose tokens agree with the prompt outside the feature
    (so the prompt's length and the other digits of a number are kept), and the joint draw is
    rejected unless the instruction stays in its split's held-out bucket (``split``), exactly
    as :func:`build_instructions` drew it. Positions the grammar fixes (task words, spacing,
    role tags) are not testable (``testable`` is False there). Word tokens of the user text
    outside the instruction (an inserted trigger) have no clean conditional: with ``foreign``
    (probabilities over the vocabulary, e.g. the word marginal of clean prompts) they are drawn
    from it, a screening null that is not exact; without it they are not testable either.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        split: str = "train",
        template: str = PLAIN_TEMPLATE,
        foreign: Tensor | None = None,
    ) -> None:
        if "{problem}" not in template:
            raise ValueError(f"the template must contain '{{problem}}', got {template!r}")
        self.tokenizer, self.val = tokenizer, split == VAL_SPLIT
        self.prefix, self.suffix = template.split("{problem}")
        self.foreign = None if foreign is None else foreign.double()
        self._parsed: dict[tuple[int, ...], ParsedPrompt | None] = {}

    def parse(self, row: Sequence[int]) -> ParsedPrompt | None:
        """The row's grammar (cached), or None when no task's grammar matches its text."""
        key = tuple(row)
        if key not in self._parsed:
            self._parsed[key] = self._parse(key)
        return self._parsed[key]

    def _parse(self, row: tuple[int, ...]) -> ParsedPrompt | None:
        text = self.tokenizer.decode(list(row))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if tuple(enc["input_ids"]) != row:
            raise ValueError("InstructionSlotSampler: a prompt does not tokenise back to itself")
        if not (text.startswith(self.prefix) and text.endswith(self.suffix)):
            return None
        user = (len(self.prefix), len(text) - len(self.suffix))
        found = instruction_slots(text[user[0] : user[1]])
        if found is None:
            return None
        (a, b), slots = found
        span = (user[0] + a, user[0] + b)
        slots = [Slot(s.start + user[0], s.end + user[0], s.values) for s in slots]
        slot_of, foreign = [], []
        for start, end in enc["offset_mapping"]:
            piece = text[start:end]
            start += len(piece) - len(piece.lstrip())  # ' a' is the letter at 'a'
            hit = [k for k, s in enumerate(slots) if start < s.end and end > s.start]
            slot_of.append(hit[0] if hit else -1)
            outside = end <= span[0] or start >= span[1]
            inside_user = start >= user[0] and end <= user[1]
            foreign.append(outside and inside_user and any(ch.isalnum() for ch in piece))
        return ParsedPrompt(text, span, slots, slot_of, foreign)

    def slot_candidates(
        self, parsed: ParsedPrompt, row: Sequence[int], slot: int, positions: tuple[int, ...]
    ) -> tuple[list[str], Tensor]:
        """Values of `slot` whose tokens equal the row's outside `positions`, and their tokens
        at `positions` (len(values), len(positions))."""
        key = (slot, positions)
        if key not in parsed.candidates:
            s, keep = parsed.slots[slot], [k for k in range(len(row)) if k not in positions]
            values, tokens = [], []
            for value in s.values:
                text = parsed.text[: s.start] + value + parsed.text[s.end :]
                ids = self.tokenizer(text, add_special_tokens=False).input_ids
                if len(ids) == len(row) and all(ids[k] == row[k] for k in keep):
                    values.append(value)
                    tokens.append([ids[k] for k in positions])
            parsed.candidates[key] = (values, torch.tensor(tokens))
        return parsed.candidates[key]

    def row_testable(self, row: Sequence[int], positions: list[int]) -> bool:
        parsed = self.parse(row)
        if parsed is None:
            return False
        return all(
            parsed.slot_of[k] >= 0 or (parsed.foreign[k] and self.foreign is not None)
            for k in positions
        )

    def testable(self, inputs: Tensor, mask: Tensor) -> Tensor:
        positions = token_positions(mask)
        return torch.tensor([self.row_testable(row, positions) for row in inputs.tolist()])

    def held_out_ok(self, parsed: ParsedPrompt, values: dict[int, str]) -> bool:
        """Whether the instruction with `values` in its slots stays in this split's bucket."""
        text, (start, end) = parsed.text, parsed.instruction
        pieces, at = [], start
        for k in sorted(values):
            s = parsed.slots[k]
            pieces += [text[at : s.start], values[k]]
            at = s.end
        return held_out("".join([*pieces, text[at:end]])) == self.val

    def draw_row(
        self, row: list[int], positions: list[int], num_draws: int, generator: torch.Generator
    ) -> Tensor:
        """(num_draws, len(positions)) tokens for one testable row (rejection on the bucket)."""
        parsed = self.parse(row)
        out = torch.tensor(row)[positions].repeat(num_draws, 1)
        by_slot: dict[int, list[int]] = {}
        for c, k in enumerate(positions):
            if parsed.slot_of[k] >= 0:
                by_slot.setdefault(parsed.slot_of[k], []).append(c)
            else:
                out[:, c] = torch.multinomial(self.foreign, num_draws, True, generator=generator)
        tables = {
            s: self.slot_candidates(parsed, row, s, tuple(positions[c] for c in cols))
            for s, cols in by_slot.items()
        }
        for d in range(num_draws):
            while True:
                picks = {
                    s: int(torch.randint(len(tables[s][0]), (1,), generator=generator))
                    for s in tables
                }
                if self.held_out_ok(parsed, {s: tables[s][0][i] for s, i in picks.items()}):
                    break
            for s, i in picks.items():
                out[d, by_slot[s]] = tables[s][1][i]
        return out

    def sample(
        self, inputs: Tensor, mask: Tensor, num_draws: int, generator: torch.Generator
    ) -> Tensor:
        positions = token_positions(mask)
        rows = inputs.cpu().tolist()
        values = torch.tensor(rows)[:, positions].repeat(num_draws, 1, 1)
        for i, row in enumerate(rows):
            if self.row_testable(row, positions):
                values[:, i] = self.draw_row(row, positions, num_draws, generator)
        return fill(inputs, mask, values)
