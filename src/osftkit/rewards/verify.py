"""Decide whether a response's final answer matches the gold answer."""

import math
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache, partial
from typing import Any

from osftkit.rewards.comparators import exact_match, math_equal
from osftkit.rewards.extract import extract_boxed, extract_gsm8k
from osftkit.rewards.reference_grader import reference_equal

EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "boxed": extract_boxed,
    "gsm8k": lambda text: extract_gsm8k(text) or extract_boxed(text),
    "whole": lambda text: text.strip(),
}
# Chunks per worker when a batch is scored in parallel: a few, so that one slow chunk (answers
# that run into the timeout) does not leave the other workers idle.
CHUNKS_PER_WORKER = 4


# "math": math-verify; "sept": the SePT code's grader (Hendrycks normalisation, sympy, then
# math-verify), more lenient on units, text and tuples (reference_grader.py).
COMPARATORS: dict[str, Callable[..., bool]] = {
    "exact": exact_match,
    "math": math_equal,
    "sept": reference_equal,
}


class AnswerChecker:
    """Binary verifier: extract the final answer (`boxed`, `gsm8k`, `whole`) and compare it
    (`exact`, `math`: math-verify, `sept`: the Online SFT reference's grader).

    `timeout_s` bounds math-verify's parse and comparison (the Online SFT reference uses 1 s);
    with `num_workers` >= 2 a batch of more answers than workers is scored in that many worker
    processes (validation of 500 problems x 8 samples), with the same results as one process.
    """

    def __init__(
        self,
        extract: str = "boxed",
        compare: str = "exact",
        timeout_s: int = 1,
        num_workers: int = 0,
    ) -> None:
        if extract not in EXTRACTORS:
            raise ValueError(f"extract must be one of {sorted(EXTRACTORS)}, got '{extract}'")
        if compare not in COMPARATORS:
            raise ValueError(f"compare must be one of {sorted(COMPARATORS)}, got '{compare}'")
        # math-verify's timeouts are whole seconds (signal.alarm).
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 1:
            raise ValueError(f"checker.timeout_s must be a whole number >= 1, got {timeout_s!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"checker.num_workers must be an integer >= 0, got {num_workers!r}")
        self.settings = (extract, compare, timeout_s)
        self.extract = EXTRACTORS[extract]
        self.compare = partial(COMPARATORS[compare], timeout_s=timeout_s)
        self.num_workers = num_workers
        self._pool: ProcessPoolExecutor | None = None

    def __call__(self, response: str, gold: str) -> bool:
        prediction = self.extract(response)
        return prediction is not None and self.compare(prediction, gold)

    def score(self, responses: list[str], golds: list[str]) -> list[bool]:
        pairs = list(zip(responses, golds, strict=True))
        if self.num_workers < 2 or len(pairs) <= self.num_workers:
            return [self(response, gold) for response, gold in pairs]
        size = math.ceil(len(pairs) / (self.num_workers * CHUNKS_PER_WORKER))
        chunks = [pairs[i : i + size] for i in range(0, len(pairs), size)]
        scored = self.pool().map(partial(score_chunk, self.settings), chunks)
        return [correct for chunk in scored for correct in chunk]

    def pool(self) -> ProcessPoolExecutor:
        """The worker processes, started on first use (spawned: safe after CUDA is set up)."""
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(self.num_workers, mp_context=context)
        return self._pool

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": None}  # a pool does not travel (pickling, deepcopy)


@lru_cache(maxsize=8)
def worker_checker(settings: tuple[str, str, int]) -> AnswerChecker:
    return AnswerChecker(*settings)


def score_chunk(settings: tuple[str, str, int], pairs: list[tuple[str, str]]) -> list[bool]:
    """A worker process scores its chunk serially (math-verify's alarms need a main thread)."""
    checker = worker_checker(settings)
    return [checker(response, gold) for response, gold in pairs]
