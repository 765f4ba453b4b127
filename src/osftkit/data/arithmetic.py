"""Synthetic multi-step arithmetic with worked solutions, built offline and deterministically."""

import random
import zlib

from datasets import Dataset

DIGITS = "0123456789"


def _reduce_once(operands: list[int], ops: list[str]) -> tuple[str, int]:
    """Apply the next operation by precedence (first `*`, else leftmost); return the step text."""
    i = ops.index("*") if "*" in ops else 0
    left, right, op = operands[i], operands[i + 1], ops[i]
    value = {"+": left + right, "-": left - right, "*": left * right}[op]
    operands[i : i + 2] = [value]
    del ops[i]
    return f"{left}{op}{right}={value}", value


def make_problem(rng: random.Random, num_ops: int, operand_max: int, ops: str) -> dict[str, str]:
    """One problem, its step-by-step solution ending in \\boxed{}, and its final answer."""
    operands = [rng.randint(0, operand_max) for _ in range(num_ops + 1)]
    chosen = [rng.choice(ops) for _ in range(num_ops)]
    problem = "".join(f"{a}{op}" for a, op in zip(operands, chosen, strict=False)) + str(operands[-1])
    steps, value = [], operands[0]
    while chosen:
        step, value = _reduce_once(operands, chosen)
        steps.append(step)
    solution = "\n".join([*steps, f"\\boxed{{{value}}}"])
    return {"problem": problem, "solution": solution, "answer": str(value)}


def add_digit_noise(text: str, rate: float, rng: random.Random) -> str:
    """Replace each digit, with probability `rate`, by a different random digit (label noise)."""
    return "".join(
        rng.choice(DIGITS.replace(c, "")) if c in DIGITS and rng.random() < rate else c
        for c in text
    )


def build_arithmetic(
    split: str,
    size: int,
    seed: int = 0,
    num_ops: int = 2,
    operand_max: int = 9,
    ops: str = "+*",
    label_noise: float = 0.0,
) -> Dataset:
    """A `datasets.Dataset` of `size` problems; `label_noise` corrupts digits of the solutions."""
    if size < 1 or num_ops < 1 or operand_max < 1:
        raise ValueError("arithmetic: size, num_ops and operand_max must all be >= 1")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"arithmetic: label_noise must be in [0, 1], got {label_noise}")
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"arithmetic: ops must be a non-empty string over '+-*', got '{ops}'")
    # Each split has its own stream so train, val and test are drawn independently.
    rng = random.Random(zlib.crc32(f"{seed}/{split}".encode()))
    rows = [make_problem(rng, num_ops, operand_max, ops) for _ in range(size)]
    if label_noise > 0:
        for row in rows:
            row["solution"] = add_digit_noise(row["solution"], label_noise, rng)
    return Dataset.from_list(rows)
