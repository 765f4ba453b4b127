"""Synthetic multi-step arithmetic with worked solutions, built offline and deterministically."""

import random
import zlib

from datasets import Dataset

DIGITS = "0123456789"


def add_digit_noise(text: str, rate: float, rng: random.Random) -> str:
    """Replace each digit, with probability `rate`, by a different random digit (label noise)."""
    return "".join(
        rng.choice(DIGITS.replace(c, "")) if c in DIGITS and rng.random() < rate else c
        for c in text
    )


def solve(
    operands: list[int], ops: list[str], noise: float = 0.0, rng=None
) -> tuple[list[str], int]:
    """Reduce by precedence (first `*`, else leftmost), one line per operation.

    With `noise`, each written result has its digits corrupted and LATER STEPS USE THE CORRUPTED
    VALUE (a noisy calculator): a wrong digit anywhere makes the final answer wrong, so the
    final answer is right with probability ~(1 - noise)^(result digits) when sampled.
    """
    operands, ops, steps = list(operands), list(ops), []
    while ops:
        i = ops.index("*") if "*" in ops else 0
        left, right, op = operands[i], operands[i + 1], ops.pop(i)
        value = {"+": left + right, "-": left - right, "*": left * right}[op]
        if noise:
            value = int(add_digit_noise(str(value), noise, rng))
        operands[i : i + 2] = [value]
        steps.append(f"{left}{op}{right}={value}")
    return steps, operands[0]


def make_problem(
    rng: random.Random,
    num_ops: int,
    operand_max: int,
    ops: str,
    label_noise: float = 0.0,
    noise_rng: random.Random | None = None,
) -> dict[str, str]:
    """One problem, its step-by-step solution ending in \\boxed{}, and its true final answer."""
    operands = [rng.randint(0, operand_max) for _ in range(num_ops + 1)]
    chosen = [rng.choice(ops) for _ in range(num_ops)]
    problem = "".join(f"{a}{op}" for a, op in zip(operands, chosen, strict=False)) + str(
        operands[-1]
    )
    _, answer = solve(operands, chosen)
    steps, written = solve(operands, chosen, label_noise, noise_rng)
    solution = "\n".join([*steps, f"\\boxed{{{written}}}"])
    return {"problem": problem, "solution": solution, "answer": str(answer)}


def build_arithmetic(
    split: str,
    size: int,
    seed: int = 0,
    num_ops: int = 2,
    operand_max: int = 9,
    ops: str = "+*",
    label_noise: float = 0.0,
) -> Dataset:
    """A `datasets.Dataset` of `size` problems; `label_noise` corrupts the digits of each step's
    result in the solutions (the `answer` column always holds the true answer)."""
    if size < 1 or num_ops < 1 or operand_max < 1:
        raise ValueError("arithmetic: size, num_ops and operand_max must all be >= 1")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"arithmetic: label_noise must be in [0, 1], got {label_noise}")
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"arithmetic: ops must be a non-empty string over '+-*', got '{ops}'")
    # Each split has its own stream so train, val and test are drawn independently; the noise
    # has another, so the problems do not change with the noise level.
    rng = random.Random(zlib.crc32(f"{seed}/{split}".encode()))
    noise_rng = random.Random(zlib.crc32(f"{seed}/{split}/noise".encode()))
    rows = [
        make_problem(rng, num_ops, operand_max, ops, label_noise, noise_rng) for _ in range(size)
    ]
    return Dataset.from_list(rows)
