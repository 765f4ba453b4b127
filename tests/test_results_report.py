"""Tables from the store: rendering with intervals and counts, README blocks, the --check."""

from pathlib import Path

from test_results_store import add_record, commit, git_repo

from osftkit.results.report import Column, Paired, Table, check, render, report
from osftkit.results.store import ResultStore, problem_outcomes

TABLE = Table("demo.main", [Column("pass@1", "val/pass@1"), Column("wall s", "wall_s", digits=0)])
README = "# Demo\n\n<!-- results:demo.main -->\n<!-- /results:demo.main -->\n\nProse.\n"


def add(store: ResultStore, repo: Path, arm: str, seed: int, hits: list[bool], **kw) -> None:
    problems = problem_outcomes(
        [f"p{i}" for i in range(len(hits))], [[h] for h in hits], [[5]] * len(hits)
    )
    add_record(
        store,
        table="demo.main",
        arm=arm,
        seed=seed,
        metrics={"val/pass@1": sum(hits) / len(hits), "wall_s": 10.0 + seed},
        problems=problems,
        root=repo,
        **kw,
    )


def study(tmp_path: Path) -> tuple[Path, ResultStore, Path]:
    repo = git_repo(tmp_path / "repo")
    (repo / "README.md").write_text(README)
    commit(repo, "readme")
    store = ResultStore(tmp_path / "store")
    for seed in (0, 1):
        add(store, repo, "OSFT", seed, [True, False, True, True])
        add(store, repo, "GRPO", seed, [True, False, False, True])
    return repo, store, repo / "README.md"


def test_table_rows_carry_counts_intervals_and_commits(tmp_path: Path) -> None:
    repo, store, _ = study(tmp_path)
    text = render(TABLE, store.records())
    osft = next(line for line in text.splitlines() if line.startswith("| OSFT"))
    cells = [c.strip() for c in osft.strip("|").split("|")]
    # seeds, problems, samples; pass@1 from the per-problem bootstrap; wall s: t over seeds.
    assert cells[1:4] == ["2", "4", "1"]
    assert cells[4].startswith("0.750 [")
    assert cells[5].startswith("10 [")  # mean 10.5 at 0 digits rounds to 10
    assert cells[6] == store.records()[0]["commit"][:7]


def test_check_passes_after_report_and_fails_on_a_hand_edit(tmp_path: Path) -> None:
    repo, store, readme = study(tmp_path)
    assert check([readme], "demo", [TABLE], store.records(), repo)  # empty block: differs
    report([readme], [TABLE], store.records())
    assert readme.read_text().endswith("Prose.\n")
    assert check([readme], "demo", [TABLE], store.records(), repo) == []
    readme.write_text(readme.read_text().replace("0.750", "0.760", 1))
    (problem,) = check([readme], "demo", [TABLE], store.records(), repo)
    assert "differs from the store" in problem


def test_check_fails_on_a_block_no_table_generates(tmp_path: Path) -> None:
    repo, store, readme = study(tmp_path)
    report([readme], [TABLE], store.records())
    readme.write_text(
        readme.read_text() + "<!-- results:demo.old -->\n<!-- /results:demo.old -->\n"
    )
    (problem,) = check([readme], "demo", [TABLE], store.records(), repo)
    assert "demo.old" in problem


def test_check_fails_on_a_mixed_commit_table_unless_the_row_is_stale(tmp_path: Path) -> None:
    repo, store, readme = study(tmp_path)
    old = store.records()[0]["commit"]
    (repo / "README.md").write_text(README + "\nA README change is not a code change.\n")
    commit(repo, "docs")
    add(store, repo, "SFT", 0, [True, True, False, False])
    report([readme], [TABLE], store.records())
    assert check([readme], "demo", [TABLE], store.records(), repo) == []
    (repo / "src/a.py").write_text("x = 2\n")
    commit(repo, "code")
    add(store, repo, "EM-FT", 0, [True, True, True, False])
    report([readme], [TABLE], store.records())
    (problem,) = check([readme], "demo", [TABLE], store.records(), repo)
    assert "EM-FT" in problem and old[:7] in problem
    # Marked stale with its commit, the row is allowed and says so.
    add(store, repo, "DAPO", 0, [True, True, True, False], stale=old)
    report([readme], [TABLE], store.records())
    assert "| DAPO |" in readme.read_text() and f"stale @ {old[:7]}" in readme.read_text()
    assert len(check([readme], "demo", [TABLE], store.records(), repo)) == 1  # EM-FT only
    # A row measured on uncommitted code is refused too.
    add(store, repo, "Dr. GRPO", 0, [True, False, True, False])  # the README report() wrote
    (problem,) = [
        p for p in check([readme], "demo", [TABLE], store.records(), repo) if "dirty" in p
    ]
    assert "Dr. GRPO" in problem


def test_check_compares_code_by_the_stamped_trees_without_the_history(tmp_path: Path) -> None:
    """CI checks out one commit: the rows' own src/ and configs/ tree ids decide."""
    repo, store, readme = study(tmp_path)
    (repo / "README.md").write_text(README + "\nDocs only.\n")
    commit(repo, "docs")
    add(store, repo, "SFT", 0, [True, True, False, False])
    (repo / "src/a.py").write_text("x = 2\n")
    commit(repo, "code")
    add(store, repo, "EM-FT", 0, [True, True, True, False])
    records = store.records()
    assert records[0]["code"] == records[-2]["code"] != records[-1]["code"]
    report([readme], [TABLE], records)
    shallow = tmp_path / "shallow"  # no git at all: only the stamps can answer
    shallow.mkdir()
    (problem,) = check([readme], "demo", [TABLE], records, shallow)
    assert "EM-FT" in problem
    # A record from before the stamp falls back to git, which cannot answer here: it differs.
    unstamped = [{**r, "code": None} if r["arm"] == "SFT" else r for r in records]
    problems = check([readme], "demo", [TABLE], unstamped, shallow)
    assert any("'SFT'" in p for p in problems)


def test_paired_table_resamples_seeds_and_prompts_and_adjusts_with_holm(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "store")

    def prompts(asr: int, clean: list[int]) -> list[dict]:
        return [{"id": f"q{i}", "n": 1, "correct": c, "asr": asr} for i, c in enumerate(clean)]

    clean = [i % 2 for i in range(40)]
    for seed in (0, 1, 2):
        for arm, asr in (("backdoored", 1), ("removal", 0)):
            problems = prompts(asr, clean)
            add_record(store, table="demo.pair", arm=arm, seed=seed, problems=problems)
    add_record(store, table="demo.pair", arm="old row")
    table = Paired(
        "demo.paired", "demo.pair", "backdoored", [("ASR", "asr"), ("clean", "correct")], scale=100
    )
    lines = render(table, store.records()).splitlines()
    removal = next(line for line in lines if line.startswith("| removal"))
    asr, same = [c.strip() for c in removal.strip("|").split("|")][1:]
    assert asr.startswith("-100.0 [-100.0, -100.0], p 0.000")
    assert same.startswith("+0.0") and "p 1.000 (Holm 1.000)" in same
    assert next(line for line in lines if line.startswith("| old row")) == "| old row | - | - |"
