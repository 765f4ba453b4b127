"""The results store: one JSONL line per finished run, stamped so that a table can say where each
number came from; optionally every sample of a run in its own JSONL, for another grader.

A record: study table, arm, seed, the git commit (and whether the tree was dirty), the ids of
that commit's src/ and configs/ trees (so a checkout without the history can still tell whether
two rows ran the same code), a hash of the resolved config, the base model, the time, the run's
metrics and, where the run recorded them, its per-problem outcomes (problem id, samples,
correct, response lengths). A record imported
from a results file of an older revision carries `stale`: the commit it was measured on, which
a table prints beside the row.
"""

import hashlib
import json
import re
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

SAMPLES_DIR = "samples"
CODE_DIRS = ("src", "configs")


def git_state(root: Path) -> tuple[str, bool]:
    """(commit, dirty) of the checkout at `root`; ('unknown', True) outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return commit, bool(status.strip())


def code_trees(commit: str, root: Path) -> str | None:
    """The git tree ids of `commit`'s src/ and configs/, joined; None where git cannot say."""
    done = subprocess.run(
        ["git", "rev-parse", *(f"{commit}:{d}" for d in CODE_DIRS)],
        cwd=root,
        capture_output=True,
        text=True,
    )
    return "+".join(done.stdout.split()) if done.returncode == 0 else None


def config_hash(config: Mapping[str, Any], ignore: Sequence[str] = ("paths",)) -> str:
    """Short sha256 of a resolved config (a plain mapping), leaving out the keys in `ignore`
    (output paths differ between two runs of the same recipe)."""
    kept = {key: value for key, value in config.items() if key not in ignore}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def problem_outcomes(
    problem_ids: Sequence[str],
    correct: Sequence[Sequence[bool]],
    lengths: Sequence[Sequence[int]],
) -> list[dict[str, Any]]:
    """Per-problem records from (problems, samples) correctness and response lengths."""
    rows = zip(problem_ids, correct, lengths, strict=True)
    return [
        {"id": str(pid), "n": len(hits), "correct": int(sum(hits)), "lengths": [int(n) for n in ls]}
        for pid, hits, ls in rows
    ]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


class ResultStore:
    """Records of one study in `directory`/records.jsonl; samples under `directory`/samples/."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "records.jsonl"

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def find(self, arm: str, seed: int | None, config_hash: str) -> dict[str, Any] | None:
        """The latest record of this arm, seed and config (a resumed study skips it); a stale
        record does not count: the study measures it again on the current code."""
        key = (arm, seed, config_hash)
        found = [
            r
            for r in self.records()
            if (r["arm"], r["seed"], r["config_hash"]) == key and not r["stale"]
        ]
        return found[-1] if found else None

    def has(self, arm: str, seed: int | None, config_hash: str) -> bool:
        return self.find(arm, seed, config_hash) is not None

    def add(
        self,
        *,
        table: str,
        arm: str,
        seed: int | None,
        config_hash: str,
        base_model: str,
        metrics: Mapping[str, float],
        problems: list[dict[str, Any]] | None = None,
        samples: Iterable[Mapping[str, Any]] | None = None,
        root: Path | None = None,
        stale: str | None = None,
        counts: Mapping[str, int] | None = None,
        extra: Mapping[str, Any] | None = None,
        measured_at: tuple[str, bool] | None = None,
    ) -> dict[str, Any]:
        """Append one run's record, stamped with `measured_at` (the commit and dirtiness of
        the checkout the run was launched from) or else the commit of `root` (default: this
        file's checkout) now; `samples` (problem_id, sample, response, gold, answer, correct)
        go to their own file; `counts` (problems, samples) states them for a record without
        outcomes."""
        root = root or Path(__file__).resolve().parent
        commit, dirty = measured_at or git_state(root)
        record: dict[str, Any] = {
            "table": table,
            "arm": arm,
            "seed": seed,
            "config_hash": config_hash,
            "commit": stale or commit,
            "dirty": False if stale else dirty,
            "stale": stale is not None,
            "code": None if stale else code_trees(commit, root),
            "base_model": base_model,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metrics": dict(metrics),
            "problems": problems or [],
            "samples": None,
            **({"counts": dict(counts)} if counts else {}),
            **({"extra": dict(extra)} if extra else {}),
        }
        if samples is not None:
            record["samples"] = self.write_samples(f"{slug(arm)}_s{seed}_{config_hash}", samples)
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:  # one line per run: a killed study loses no record
            handle.write(json.dumps(record) + "\n")
        return record

    def write_samples(self, name: str, samples: Iterable[Mapping[str, Any]]) -> str:
        """Every sample as JSONL (path relative to the store) that another grader can re-score."""
        path = self.directory / SAMPLES_DIR / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as handle:
            for sample in samples:
                handle.write(json.dumps(dict(sample)) + "\n")
        return str(path.relative_to(self.directory))
