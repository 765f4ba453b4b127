"""Per-problem outcomes of a validation, written to a results store (and, on request, every
sample, so that another grader can re-score them: `python -m osftkit.results.rescore`), or, in
training, to one file per validation in the run directory (`callbacks.validation_outcomes`).

The method hands each validation batch to `module.outcome_sink`; `OutcomeRecorder.add_record`
then writes one store record per validation (one per tau_eval of a sweep)."""

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor

from osftkit.results.store import ResultStore, problem_outcomes


class OutcomeRecorder:
    """Collects (problem, sample) outcomes of the current validation, per validation set."""

    def __init__(
        self,
        store: ResultStore | None = None,
        stamp: Mapping[str, Any] | None = None,
        extract: Callable[[str], str | None] | None = None,
        store_samples: bool = False,
    ) -> None:
        """Without `store` it only collects (`add_record` needs one); `extract` (the checker's
        answer extraction) is needed only for `store_samples`."""
        self.store, self.stamp, self.extract = store, dict(stamp or {}), extract
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
        if self.store is None:
            raise ValueError("OutcomeRecorder.add_record needs the store it writes to")
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


class ValidationOutcomes(L.Callback):
    """Training's validations, problem by problem: after each, `dirpath`/step<N>.json holds
    {set: [{id, n, correct, lengths}, ...]} at optimiser step N, so that a study can read the
    outcomes of the step it chose on a dev split. Each rank writes the rows it scored (a file
    per rank, `step<N>.rank<r>.json`, when there are several)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.outcome_sink = OutcomeRecorder()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.outcome_sink.reset()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        sink = pl_module.outcome_sink
        by_set: dict[str, list[dict[str, Any]]] = {}
        for row in problem_outcomes(sink.ids, sink.correct, sink.lengths):
            by_set.setdefault(row["id"].split("/")[0], []).append(row)
        rank = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        path = self.dirpath / f"step{trainer.global_step}{rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        partial.write_text(json.dumps(by_set))
        os.replace(partial, path)  # a killed run leaves no half-written file


def read_validation_outcomes(dirpath: Path) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """step -> {set: problem outcomes} of a run's `ValidationOutcomes` files (one rank)."""
    files = [f for f in Path(dirpath).glob("step*.json") if f.stem.removeprefix("step").isdigit()]
    return {int(f.stem.removeprefix("step")): json.loads(f.read_text()) for f in files}
