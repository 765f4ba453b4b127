"""Per-problem outcomes of a validation, written to a results store (and, on request, every
sample, so that another grader can re-score them: `python -m osftkit.results.rescore`).

The method hands each validation batch to `module.outcome_sink`; `OutcomeRecorder.add_record`
then writes one store record per validation (one per tau_eval of a sweep)."""

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from osftkit.results.store import ResultStore, problem_outcomes


class OutcomeRecorder:
    """Collects (problem, sample) outcomes of the current validation, per validation set."""

    def __init__(
        self,
        store: ResultStore,
        stamp: Mapping[str, Any],
        extract: Callable[[str], str | None],
        store_samples: bool = False,
    ) -> None:
        self.store, self.stamp, self.extract = store, dict(stamp), extract
        self.store_samples = store_samples
        self.written: list[dict[str, Any]] = []  # this run's records
        self.reset()

    def reset(self) -> None:
        self.ids: list[str] = []
        self.correct: list[list[bool]] = []
        self.lengths: list[list[int]] = []
        self.samples: list[dict[str, Any]] = []
        self.seen: dict[str, int] = {}  # problems per validation set so far (their ids)

    def __call__(
        self, name: str, answers: list[str], correct: Tensor, lengths: Tensor, texts: list[str]
    ) -> None:
        """One batch: `correct` and `lengths` are (problems, samples); `texts` row-major."""
        group = correct.shape[1]
        start = self.seen.get(name, 0)
        self.seen[name] = start + len(answers)
        for row, gold in enumerate(answers):
            pid = f"{name}/{start + row}"  # the loader's fixed order: the same id on every run
            hits = [bool(c) for c in correct[row].tolist()]
            self.ids.append(pid)
            self.correct.append(hits)
            self.lengths.append([int(n) for n in lengths.view(-1, group)[row].tolist()])
            if self.store_samples:
                responses = texts[row * group : (row + 1) * group]
                self.samples += [
                    {
                        "problem_id": pid,
                        "sample": i,
                        "response": text,
                        "gold": gold,
                        "answer": self.extract(text),
                        "correct": hit,
                    }
                    for i, (text, hit) in enumerate(zip(responses, hits, strict=True))
                ]

    def add_record(self, row: Mapping[str, float], split: str) -> dict[str, Any]:
        """The current validation as one store record (arm: split and tau_eval)."""
        record = self.store.add(
            arm=f"{split} tau_eval={row['tau_eval']:g}",
            metrics=row,
            problems=problem_outcomes(self.ids, self.correct, self.lengths),
            samples=self.samples if self.store_samples else None,
            root=Path(__file__).resolve().parent,
            **self.stamp,
        )
        self.written.append(record)
        self.reset()
        return record
