"""The results store: stamped records, per-problem outcomes, samples, resuming a killed study."""

import json
import subprocess
from pathlib import Path
from typing import Any

from osftkit.results.store import ResultStore, config_hash, git_state, problem_outcomes


def git_repo(path: Path) -> Path:
    """A one-commit git repository (src/a.py, configs/c.yaml, README.md) in `path`."""
    for name, text in (("src/a.py", "x = 1\n"), ("configs/c.yaml", "a: 1\n"), ("README.md", "")):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    commit(path, "first")
    return path


def add_record(store: ResultStore, **fields: Any) -> dict[str, Any]:
    """A record with placeholder stamps (table t, arm a, seed 0, ...); `fields` override them."""
    defaults = {"table": "t", "arm": "a", "seed": 0, "config_hash": "h", "base_model": "m"}
    return store.add(**{**defaults, "metrics": {}, **fields})


def commit(path: Path, message: str) -> str:
    env = ["-c", "user.name=t", "-c", "user.email=t@t"]
    if not (path / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    subprocess.run(["git", *env, "commit", "-qm", message], cwd=path, check=True)
    return git_state(path)[0]


def test_records_are_stamped_and_resume_skips_them(tmp_path: Path) -> None:
    repo = git_repo(tmp_path / "repo")
    store = ResultStore(tmp_path / "store")
    digest = config_hash({"seed": 0, "method": {"lr": 1e-5}, "paths": {"output_dir": "/a"}})
    assert digest == config_hash({"seed": 0, "method": {"lr": 1e-5}, "paths": {"output_dir": "/b"}})
    assert digest != config_hash({"seed": 0, "method": {"lr": 2e-5}})
    problems = problem_outcomes(["p0", "p1"], [[True, False], [True, True]], [[3, 4], [5, 6]])
    assert not store.has("OSFT", 0, digest)
    store.add(
        table="study.main",
        arm="OSFT",
        seed=0,
        config_hash=digest,
        base_model="arith_base",
        metrics={"val/pass@1": 0.75},
        problems=problems,
        root=repo,
    )
    # A second process (the resumed study) reads the same file.
    again = ResultStore(tmp_path / "store")
    assert again.has("OSFT", 0, digest)
    assert not again.has("OSFT", 1, digest)
    (record,) = again.records()
    assert record["commit"] == git_state(repo)[0] and record["dirty"] is False
    assert record["problems"][1] == {"id": "p1", "n": 2, "correct": 2, "lengths": [5, 6]}
    assert {"base_model", "time", "config_hash", "seed", "arm"} <= record.keys()


def test_a_dirty_tree_is_recorded_as_dirty(tmp_path: Path) -> None:
    repo = git_repo(tmp_path / "repo")
    (repo / "src/a.py").write_text("x = 2\n")
    record = ResultStore(tmp_path / "store").add(
        table="t", arm="a", seed=0, config_hash="h", base_model="m", metrics={}, root=repo
    )
    assert record["dirty"] is True


def test_samples_are_written_for_another_grader(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "store")
    samples = [
        {
            "problem_id": "p0",
            "sample": 0,
            "response": r"so \boxed{4}",
            "gold": "4",
            "answer": "4",
            "correct": True,
        },
    ]
    record = add_record(store, arm="GRPO (G = 8)", seed=1, samples=samples)
    lines = (store.directory / record["samples"]).read_text().splitlines()
    assert [json.loads(line) for line in lines] == samples


def test_stale_records_keep_the_commit_they_were_measured_on(tmp_path: Path) -> None:
    record = ResultStore(tmp_path).add(
        table="t",
        arm="a",
        seed=None,
        config_hash="legacy",
        base_model="m",
        metrics={"x": 1.0},
        stale="af49aff",
    )
    assert (record["commit"], record["stale"], record["dirty"]) == ("af49aff", True, False)
    assert not ResultStore(tmp_path).has("a", None, "legacy")  # a rerun measures it again


def test_git_state_outside_a_checkout(tmp_path: Path) -> None:
    assert git_state(tmp_path) == ("unknown", True)
