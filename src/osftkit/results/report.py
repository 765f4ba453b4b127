"""Tables only from the store: render a study's tables from its records, write them into the
README between markers, and check that the README says what the store says.

    <!-- results:NAME -->
    (generated: do not edit)
    <!-- /results:NAME -->

`check` fails when a block differs from what the store generates, when a README holds a block
the study does not generate, when a row was measured on a dirty tree, or when a table mixes rows
measured on commits that differ in `src/` or `configs/` (a row imported from an older revision
is marked stale with its commit and allowed: the table prints that commit beside it).
"""

import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from osftkit.results.stats import (
    Estimate,
    hierarchical_interval,
    holm,
    paired_difference,
    seed_interval,
)
from osftkit.results.store import CODE_DIRS

BLOCK = re.compile(
    r"<!-- results:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /results:(?P=name) -->", re.S
)


@dataclass(frozen=True)
class Column:
    """One column: a metric (mean and 95% interval over the row's records, times `scale`) or,
    with `label_key`, a text the table holds for the row (a paper's reference number)."""

    title: str
    metric: str | None = None
    scale: float = 1.0
    digits: int = 3
    label_key: str | None = None
    interval: bool = True  # False: the mean alone (steps, seconds, tokens)


@dataclass(frozen=True)
class Table:
    """A generated table: the records whose `table` field is `name`, one row per arm in
    `rows` order (arms not listed follow in record order)."""

    name: str
    columns: Sequence[Column]
    rows: Sequence[str] = ()
    caption: str = ""
    # metric -> the per-problem outcome field it averages (a fraction of the problem's n samples)
    problem_fields: Mapping[str, str] = field(default_factory=lambda: {"val/pass@1": "correct"})
    counts: bool = True  # seeds / problems / samples columns
    filter: Callable[[dict[str, Any]], bool] | None = field(default=None, compare=False)
    labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # arm -> key -> text


def group_rows(table: Table, records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    mine = [
        r for r in records if r["table"] == table.name and (not table.filter or table.filter(r))
    ]
    order = [*table.rows, *dict.fromkeys(r["arm"] for r in mine)]
    grouped = {arm: [r for r in mine if r["arm"] == arm] for arm in dict.fromkeys(order)}
    return {arm: rows for arm, rows in grouped.items() if rows}


def problem_grid(rows: list[dict[str, Any]], outcome: str = "correct") -> np.ndarray | None:
    """(seeds, problems) per-problem score `outcome` / n when every record has the same problems
    in the same order (None otherwise)."""
    if not all(r["problems"] and outcome in r["problems"][0] for r in rows):
        return None
    ids = [[p["id"] for p in r["problems"]] for r in rows]
    if any(i != ids[0] for i in ids):
        return None
    return np.array([[p[outcome] / p["n"] for p in r["problems"]] for r in rows])


def cell(table: Table, column: Column, arm: str, rows: list[dict[str, Any]]) -> str:
    if column.label_key:
        return table.labels.get(arm, {}).get(column.label_key, "-")
    values = [r["metrics"][column.metric] for r in rows if column.metric in r["metrics"]]
    if not values:
        return "-"
    text = f"{column.scale * np.mean(values):.{column.digits}f}"
    if not column.interval or len(rows) < 2:
        return text
    outcome = table.problem_fields.get(column.metric)
    grid = problem_grid(rows, outcome) if outcome else None
    estimate = hierarchical_interval(grid) if grid is not None else seed_interval(values)
    low, high = column.scale * estimate.low, column.scale * estimate.high
    return f"{text} [{low:.{column.digits}f}, {high:.{column.digits}f}]"


def commit_cell(rows: list[dict[str, Any]]) -> str:
    commits = sorted({r["commit"][:7] + ("+dirty" if r["dirty"] else "") for r in rows})
    return ("stale @ " if all(r["stale"] for r in rows) else "") + ", ".join(commits)


def counts(rows: list[dict[str, Any]]) -> list[str]:
    """Seeds, problems and samples per problem of a row (a record without per-problem outcomes
    may state its counts, as the imported ones do from their configs)."""
    seeds = len({r["seed"] for r in rows}) if rows[0]["seed"] is not None else "-"
    problems = {len(r["problems"]) or r.get("counts", {}).get("problems") for r in rows}
    samples = {p["n"] for r in rows for p in r["problems"]}
    samples |= {r["counts"]["samples"] for r in rows if "samples" in r.get("counts", {})}
    return [str(seeds), joined(problems), joined(samples)]


def joined(values: set) -> str:
    return ", ".join(str(v) for v in sorted(v for v in values if v)) or "-"


@dataclass(frozen=True)
class Paired:
    """A table of paired differences: each arm of `source` minus `reference`, per outcome field
    (title, field), over the seeds both have and the same problems; a hierarchical bootstrap
    interval and p-value per cell, Holm-adjusted across the whole table."""

    name: str
    source: str
    reference: str
    outcomes: Sequence[tuple[str, str]]
    rows: Sequence[str] = ()
    caption: str = ""
    scale: float = 1.0
    digits: int = 1


def paired_grids(
    rows: list[dict[str, Any]], reference: list[dict[str, Any]], outcome: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """The two arms' (seeds, problems) grids on their common seeds, or None without outcomes."""
    seeds = sorted({r["seed"] for r in rows} & {r["seed"] for r in reference}, key=str)
    if not seeds:
        return None
    first = [next(r for r in rows if r["seed"] == s) for s in seeds]
    second = [next(r for r in reference if r["seed"] == s) for s in seeds]
    a, b = problem_grid(first, outcome), problem_grid(second, outcome)
    if a is None or b is None or a.shape != b.shape:
        return None
    same = all(
        [p["id"] for p in x["problems"]] == [p["id"] for p in y["problems"]]
        for x, y in zip(first, second, strict=True)
    )
    return (a, b) if same else None


def render_paired(table: Paired, records: list[dict[str, Any]]) -> str:
    grouped = group_rows(Table(table.source, [], rows=table.rows), records)
    reference = grouped.get(table.reference, [])
    estimates = {}
    for arm, rows in grouped.items():
        for title, outcome in table.outcomes:
            grids = paired_grids(rows, reference, outcome) if arm != table.reference else None
            if grids is not None:
                estimates[arm, title] = paired_difference(*grids)
    adjusted = dict(zip(estimates, holm([e.p_value for e in estimates.values()]), strict=True))
    head = ["row", *(title for title, _ in table.outcomes)]
    lines = [table.caption, ""] if table.caption else []
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for arm in grouped:
        if arm == table.reference:
            continue
        cells = [
            paired_cell(table, estimates.get((arm, t)), adjusted.get((arm, t)))
            for t, _ in table.outcomes
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", PAIRED]
    return "\n".join(lines) + "\n"


def paired_cell(table: Paired, estimate: Estimate | None, holm_p: float | None) -> str:
    if estimate is None:
        return "-"
    mean, low, high = (table.scale * x for x in (estimate.mean, estimate.low, estimate.high))
    d = table.digits
    return (
        f"{mean:+.{d}f} [{low:+.{d}f}, {high:+.{d}f}], p {estimate.p_value:.3f} (Holm {holm_p:.3f})"
    )


PAIRED = (
    "Difference from the reference row on the same problems and seeds [95% interval], from a "
    "bootstrap over seeds and then problems; p: two-sided bootstrap p-value, Holm-adjusted across "
    "this table; '-': no per-problem outcomes stored. Generated from the store; do not edit."
)


@dataclass(frozen=True)
class Generated:
    """A block that a study's own function writes from the records (its verdicts on the
    predictions it stated), reading the rows of the tables named in `sources`."""

    name: str
    sources: Sequence[str]
    write: Callable[[list[dict[str, Any]]], str] = field(compare=False)


AnyTable = Table | Paired | Generated


def render(table: AnyTable, records: list[dict[str, Any]]) -> str:
    if isinstance(table, Paired):
        return render_paired(table, records)
    if isinstance(table, Generated):
        return table.write(records)
    return render_table(table, records)


def render_table(table: Table, records: list[dict[str, Any]]) -> str:
    """Markdown of `table` from `records`: its caption, the rows, a line on the intervals."""
    head = ["row", *(["seeds", "problems", "samples"] if table.counts else [])]
    head += [c.title for c in table.columns] + ["commit"]
    lines = [table.caption, ""] if table.caption else []
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for arm, rows in group_rows(table, records).items():
        cells = [arm.replace("|", "\\|"), *(counts(rows) if table.counts else [])]
        cells += [cell(table, c, arm, rows) for c in table.columns] + [commit_cell(rows)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", INTERVALS]
    return "\n".join(lines) + "\n"


INTERVALS = (
    "Mean [95% interval] over the row's seeds: a bootstrap over seeds and problems where the "
    "records hold per-problem outcomes, else Student's t over seeds (the seeds' spread only, not "
    "the finite problem set's); no interval for one seed. Generated from the store by "
    "`run.py --report`; do not edit."
)


def write_blocks(text: str, blocks: dict[str, str]) -> str:
    """`text` with each existing block's body replaced by the generated one."""

    def body(match: re.Match) -> str:
        name = match["name"]
        generated = blocks.get(name, match["body"])
        return f"<!-- results:{name} -->\n{generated}<!-- /results:{name} -->"

    return BLOCK.sub(body, text)


def same_code(first: dict[str, Any], second: dict[str, Any], root: Path) -> bool:
    """Whether two records ran the same src/ and configs/: by the trees stamped on them, else
    (records from before the stamp) by git at `root`; an unknown commit agrees with none."""
    if first["commit"] == second["commit"]:
        return True
    if first.get("code") and second.get("code"):
        return first["code"] == second["code"]
    done = subprocess.run(
        ["git", "diff", "--quiet", first["commit"], second["commit"], "--", *CODE_DIRS],
        cwd=root,
        capture_output=True,
    )
    return done.returncode == 0


def mixed_commits(table: AnyTable, records: list[dict[str, Any]], root: Path) -> list[str]:
    """Rows of `table` (not stale) measured on a dirty tree or on code that differs from its
    first row's (a generated block: those of all its source tables together)."""
    if isinstance(table, Generated):
        sources = [r for r in records if r["table"] in table.sources]
        return mixed_commits(
            Table(table.name, []), [{**r, "table": table.name} for r in sources], root
        )
    source = Table(table.source, []) if isinstance(table, Paired) else table
    fresh = [r for rows in group_rows(source, records).values() for r in rows if not r["stale"]]
    if not fresh:
        return []
    first = fresh[0]
    problems = [
        f"table '{table.name}': row '{r['arm']}' (seed {r['seed']}) was measured on a dirty "
        f"tree at {r['commit'][:7]}: commit the code and rerun it"
        for r in fresh
        if r["dirty"]
    ]
    return problems + [
        f"table '{table.name}': row '{r['arm']}' (seed {r['seed']}) is on {r['commit'][:7]}, "
        f"whose src/ or configs/ differ from {first['commit'][:7]}'s; rerun it or mark it stale"
        for r in fresh
        if not same_code(first, r, root)
    ]


def check(
    readmes: Sequence[Path],
    study: str,
    tables: Sequence[AnyTable],
    records: list[dict[str, Any]],
    root: Path,
) -> list[str]:
    """Every way the READMEs' blocks of `study` (names `study.*`) disagree with the store."""
    generated = {t.name: render(t, records) for t in tables}
    problems = []
    for readme in readmes:
        for match in BLOCK.finditer(readme.read_text()):
            name = match["name"]
            if not name.startswith(f"{study}."):
                continue
            if name not in generated:
                problems.append(f"{readme}: block '{name}' is generated by no table of {study}")
            elif match["body"] != generated[name]:
                problems.append(f"{readme}: block '{name}' differs from the store (run --report)")
    for table in tables:
        problems += mixed_commits(table, records, root)
    return problems


def report(
    readmes: Sequence[Path], tables: Sequence[AnyTable], records: list[dict[str, Any]]
) -> None:
    """Write every generated table into its blocks in the READMEs."""
    generated = {t.name: render(t, records) for t in tables}
    for readme in readmes:
        readme.write_text(write_blocks(readme.read_text(), generated))


def report_or_check(
    mode: str,
    readmes: Sequence[Path],
    study: str,
    tables: Sequence[AnyTable],
    records: list,
    root: Path,
) -> int:
    """`run.py --report` / `--check`: the exit status (1 when the check finds a problem)."""
    if mode == "report":
        report(readmes, tables, records)
        print(f"wrote {len(tables)} tables of {study} into {', '.join(map(str, readmes))}")
        return 0
    problems = check(readmes, study, tables, records, root)
    for problem in problems:
        print(problem)
    print(f"{study}: {'FAILED' if problems else 'README blocks agree with the store'}")
    return 1 if problems else 0
