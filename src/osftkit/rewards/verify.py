"""Decide whether a response's final answer matches the gold answer."""

from collections.abc import Callable

from osftkit.rewards.extract import extract_boxed, extract_gsm8k

EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "boxed": extract_boxed,
    "gsm8k": lambda text: extract_gsm8k(text) or extract_boxed(text),
    "whole": lambda text: text.strip(),
}


def exact_match(prediction: str, gold: str) -> bool:
    return prediction.strip() == gold.strip()


def math_equal(prediction: str, gold: str) -> bool:
    """LaTeX-aware equivalence with math-verify (\\frac{1}{2} == 0.5), exact match as a fallback."""
    if exact_match(prediction, gold):
        return True
    from math_verify import parse, verify

    try:
        return bool(verify(parse(f"${gold}$"), parse(f"${prediction}$")))
    except Exception:  # math-verify raises on unparsable LaTeX: that answer is simply wrong
        return False


COMPARATORS: dict[str, Callable[[str, str], bool]] = {"exact": exact_match, "math": math_equal}


class AnswerChecker:
    """Binary verifier: extract the final answer (`boxed`, `gsm8k`, `whole`) and compare it."""

    def __init__(self, extract: str = "boxed", compare: str = "exact") -> None:
        if extract not in EXTRACTORS:
            raise ValueError(f"extract must be one of {sorted(EXTRACTORS)}, got '{extract}'")
        if compare not in COMPARATORS:
            raise ValueError(f"compare must be one of {sorted(COMPARATORS)}, got '{compare}'")
        self.extract = EXTRACTORS[extract]
        self.compare = COMPARATORS[compare]

    def __call__(self, response: str, gold: str) -> bool:
        prediction = self.extract(response)
        return prediction is not None and self.compare(prediction, gold)

    def score(self, responses: list[str], golds: list[str]) -> list[bool]:
        return [self(response, gold) for response, gold in zip(responses, golds, strict=True)]
