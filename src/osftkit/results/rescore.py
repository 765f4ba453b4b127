"""Re-grade stored samples with another grader and report where the two disagree.

    python -m osftkit.results.rescore <samples.jsonl> --grader sept [--extract boxed] [--show 20]

A samples file is what the results store writes for a run (one JSON object per line with at
least `response`, `gold` and `correct`, the first grader's verdict). The report gives the
agreement, the two directions of disagreement, and the first disagreeing samples.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osftkit.rewards.verify import COMPARATORS, EXTRACTORS, AnswerChecker

REQUIRED = ("response", "gold", "correct")


@dataclass
class Agreement:
    """Counts of two graders' verdicts on the same samples, and the samples they disagree on."""

    total: int = 0
    agree: int = 0
    only_first: int = 0  # right for the stored grader, wrong for the new one
    only_second: int = 0  # wrong for the stored grader, right for the new one
    disagreements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.agree / self.total if self.total else float("nan")

    def summary(self, second: str) -> str:
        return (
            f"{self.total} samples: the graders agree on {self.agree} ({self.rate:.3f}); "
            f"right only for the stored grader {self.only_first}, only for {second} "
            f"{self.only_second}"
        )


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The samples of a JSONL file; one clear error naming a line that lacks a field."""
    if not path.exists():
        raise FileNotFoundError(f"samples file '{path}' does not exist")
    samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for number, sample in enumerate(samples, 1):
        missing = [key for key in REQUIRED if key not in sample]
        if missing:
            raise ValueError(f"{path}, line {number}: missing {missing} (needs {list(REQUIRED)})")
    return samples


def rescore(samples: list[dict[str, Any]], checker: AnswerChecker) -> Agreement:
    """Compare each sample's stored verdict with `checker`'s."""
    verdicts = checker.score([s["response"] for s in samples], [s["gold"] for s in samples])
    result = Agreement(total=len(samples))
    for sample, second in zip(samples, verdicts, strict=True):
        first = bool(sample["correct"])
        result.agree += first == second
        result.only_first += first and not second
        result.only_second += second and not first
        if first != second:
            result.disagreements.append({**sample, "rescored": second})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=Path)
    parser.add_argument("--grader", default="sept", choices=sorted(COMPARATORS))
    parser.add_argument("--extract", default="boxed", choices=sorted(EXTRACTORS))
    parser.add_argument("--show", type=int, default=20, help="disagreeing samples to print")
    args = parser.parse_args(argv)
    try:
        samples = read_samples(args.samples)
    except (FileNotFoundError, ValueError) as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    result = rescore(samples, AnswerChecker(extract=args.extract, compare=args.grader))
    print(result.summary(args.grader))
    for sample in result.disagreements[: args.show]:
        print(
            f"  {sample.get('problem_id', '?')}: gold {sample['gold']!r}, answer "
            f"{sample.get('answer')!r}: stored {bool(sample['correct'])}, {args.grader} "
            f"{sample['rescored']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
