"""The README's trigger-discovery tables, generated from the store's records (written by
trigger_discovery.py); `run.py --report` writes them, `run.py --check` compares them."""

from collections.abc import Callable
from typing import Any

import numpy as np

from osftkit.results.report import Generated, commit_cell
from osftkit.results.stats import hierarchical_ratio_interval

Record = dict[str, Any]
TRIGGER = "how are you"  # the planted trigger, which stage 2 tests beside the controls
FOOTER = (
    "Generated from the store (`results/records.jsonl`) by `run.py --report`; do not edit. "
    "Seeds are the planted models; 'per model' cells list them in seed order."
)


def arms(records: list[Record], table: str) -> dict[str, list[Record]]:
    """The fresh records of feature_tests.`table`, by arm in record order, seeds sorted."""
    mine = [r for r in records if r["table"] == f"feature_tests.{table}" and not r["stale"]]
    grouped: dict[str, list[Record]] = {}
    for r in mine:
        grouped.setdefault(r["arm"], []).append(r)
    return {arm: sorted(rows, key=lambda r: r["seed"]) for arm, rows in grouped.items()}


def per_model(rows: list[Record], metric: str, fmt: str = "{:.0f}") -> str:
    return " / ".join(fmt.format(r["metrics"][metric]) for r in rows)


def grid(rows: list[Record], field: str) -> np.ndarray:
    """(seeds, prompts) of a per-prompt outcome; every model was run on the same prompts."""
    return np.array([[p[field] for p in r["problems"]] for r in rows], dtype=float)


def ratio(rows: list[Record], top: str | tuple[str, ...], bottom: tuple[str, ...], empty) -> str:
    tops = sum(grid(rows, f) for f in ((top,) if isinstance(top, str) else top))
    bottoms = sum(grid(rows, f) for f in bottom)
    estimate = hierarchical_ratio_interval(tops, bottoms, empty=empty)
    if len(rows) < 2:
        return f"{estimate.mean:.3f} (one model)"
    return f"{estimate.mean:.3f} [{estimate.low:.3f}, {estimate.high:.3f}]"


def table(head: list[str], body: list[list[str]], caption: str, notes: str) -> str:
    lines = [caption, "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += [
        "| " + " | ".join([cells[0].replace("|", "\\|"), *cells[1:]]) + " |" for cells in body
    ]
    return "\n".join([*lines, "", f"{notes} {FOOTER}".strip()]) + "\n"


def rates(keep: Callable[[str], bool], caption: str) -> Callable[[list[Record]], str]:
    """FDR and power pooled over models and prompts, with a bootstrap over both."""

    def write(records: list[Record]) -> str:
        body = []
        for arm, rows in arms(records, "discovery_rates").items():
            if not keep(arm):
                continue
            carriers = int((grid(rows[:1], "trigger_tokens") > 0).sum())
            body.append(
                [
                    arm,
                    str(len(rows)),
                    f"{len(rows[0]['problems'])} ({carriers} with the trigger)",
                    per_model(rows[:1], "hypotheses"),
                    per_model(rows[:1], "num_draws") if "IRT" in arm else "-",
                    ratio(rows, "false", ("true", "false"), 0.0),
                    ratio(rows, "covered", ("trigger_tokens",), float("nan")),
                    per_model(rows, "discoveries"),
                    commit_cell(rows),
                ]
            )
        head = ["row", "models", "prompts", "hypotheses m", "K", "FDR", "power"]
        head += ["discoveries per model", "commit"]
        notes = (
            "FDR = discovered spans without a trigger token / discoveries; power = trigger-token "
            "occurrences inside a discovered span / all of them; both pooled over the models' "
            "prompts, [95% interval] from a bootstrap over models and then prompts (the same "
            "prompts for every model). K: the IRT's draws, sized from the density (below)."
        )
        return table(head, body, caption, notes)

    return write


def calibration(records: list[Record]) -> str:
    body = []
    for arm, rows in arms(records, "discovery_calibration").items():
        body.append(
            [
                arm,
                str(len(rows)),
                per_model(rows[:1], "tests"),
                f"{sum(r['metrics']['passed'] for r in rows):.0f}/{len(rows)}",
                per_model(rows, "pvalue", "{:.3g}"),
                per_model(rows, "at_floor", "{:.3f}"),
                per_model(rows, "at_ten", "{:.3f}"),
                per_model(rows, "discoveries"),
                commit_cell(rows),
            ]
        )
    head = ["row", "models", "p-values per model", "passes", "binomial p per model"]
    head += ["P(p <= 1/101) per model", "P(p <= 10/101) per model", "BH discoveries at 0.1"]
    head += ["commit"]
    notes = (
        "IRT (K = 100) where every hypothesis is null; a valid sampler puts at most 1/101 = "
        "0.0099 of the p-values at the floor and 10/101 = 0.099 at or below 10/101. 'passes': "
        "one-sided binomial tests at six levels, Bonferroni, p >= 0.01. Only the rows 'one "
        "p-value per prompt' (a hypothesis drawn blind per prompt) make the binomial exact; the "
        "pooled rows are shown for comparison (a prompt's p-values share its observed score). "
        "BH discoveries: among all pooled p-values at alpha 0.1 (every one false)."
    )
    return table(head, body, "**Calibration on null prompts**", notes)


def controls(records: list[Record]) -> str:
    grouped = arms(records, "discovery_controls")
    if not grouped:
        return table([], [], "**Negative controls**", "")
    first = next(iter(grouped.values()))[0]
    kinds = sorted(first["extra"]["frequency"])
    body = []
    for arm, rows in grouped.items():
        cells = [arm, str(len(rows))]
        cells.append(per_model(rows[:1], "num_draws") if "num_draws" in rows[0]["metrics"] else "-")
        cells.append(per_model(rows, "flagged"))
        for kind in kinds:
            cells.append(f"{sum(r['metrics'][f'flagged: {kind}'] for r in rows):.0f}")
        body.append([*cells, commit_cell(rows)])
    stage2 = [rows for arm, rows in grouped.items() if arm.startswith("stage 2")]
    largest = (
        " / ".join(
            f"{max(v for k, v in r['extra']['effects'].items() if k != TRIGGER):.2f}"
            for r in stage2[0]
        )
        if stage2
        else "-"
    )
    phrases = int(first["metrics"]["phrases"])
    per_kind = phrases // len(kinds)
    frequency = ", ".join(f"{k} {first['extra']['frequency'][k]:.2f}" for k in kinds)
    head = ["row", "models", "K", f"flagged of {phrases} per model"]
    head += [f"{k} (of {per_kind} x models)" for k in kinds] + ["commit"]
    notes = (
        f"{phrases} phrases of 1-3 words, none a trigger, each inserted after the role tag of "
        "one prompt (as the trigger is planted) of the planted models, never trained on them; "
        "flagged: a discovered span on the phrase (stage 1), every phrase (the baseline), or "
        "confirmed (stage 2, on the fresh prompts, all phrases and the trigger together). "
        f"Frequency of the kinds (mean count of their tokens per clean training prompt): "
        f"{frequency}. Stage 2's largest mean effect of a control phrase, per model: {largest} "
        "nats."
    )
    return table(head, body, "**Negative controls**", notes)


def confirmation(records: list[Record]) -> str:
    body = []
    for arm, rows in arms(records, "discovery_confirmation").items():
        if "effect" in rows[0]["metrics"]:
            cells = [
                per_model(rows, "effect", "{:.2f}"),
                per_model(rows, "p", "{:.4f}"),
                f"{sum(r['metrics']['confirmed'] for r in rows):.0f}/{len(rows)}",
            ]
        else:
            cells = [
                "-",
                "-",
                " / ".join(
                    ", ".join(f"'{c}'" for c in r["extra"]["confirmed"]) or "none" for r in rows
                ),
            ]
        candidates = (
            " / ".join(", ".join(f"'{c}'" for c in r["extra"]["candidates"]) for r in rows)
            if "extra" in rows[0]
            else "-"
        )
        body.append([arm, str(len(rows)), candidates, *cells, commit_cell(rows)])
    head = ["row", "models", "stage-1 candidates per model", "effect (nats) per model"]
    head += ["p per model", "confirmed", "commit"]
    notes = (
        "Stage 2 on 40 fresh clean prompts: the candidate minus a random clean phrase of as "
        "many words, sign flips of d - min_effect (999), BY at 0.1; min_effect from the tuning "
        "models (next table). Pipeline rows: the IRT's phrases discovered at least twice."
    )
    return table(head, body, "**Stage 2: confirmation**", notes)


def tuning(records: list[Record]) -> str:
    body = []
    for arm, rows in arms(records, "discovery_tuning").items():
        for r in rows:
            body.append(
                [
                    f"{arm} (seed {r['seed']}; one model)",
                    f"{r['metrics']['largest_control_effect']:.2f}",
                    f"{r['metrics']['trigger_effect']:.2f}",
                    ", ".join(f"'{c}'" for c in r["extra"]["confirmed_at_margin_0"]),
                    commit_cell([r]),
                ]
            )
    head = ["row", "largest effect of a tuning control (nats)", "trigger's effect (nats)"]
    head += ["confirmed at min_effect 0", "commit"]
    notes = (
        "Tuning models (planted like the reported ones, never reported) and 28 tuning control "
        "phrases (disjoint from the reported 60): min_effect = the largest control effect "
        "rounded up to 0.5 nat."
    )
    return table(head, body, "**Choosing min_effect on held-out planted models**", notes)


SOURCES = ["feature_tests.discovery_" + t for t in ("rates", "calibration", "controls")]
SOURCES += ["feature_tests.discovery_confirmation", "feature_tests.discovery_tuning"]
DISCOVERY_TABLES = [
    Generated(
        "feature_tests.discovery_density",
        SOURCES,
        rates(
            lambda arm: "masked LM" not in arm,
            "**Stage 1 at two trigger densities** (alpha 0.1, single tokens)",
        ),
    ),
    Generated(
        "feature_tests.discovery_samplers",
        SOURCES,
        rates(
            lambda arm: arm.startswith("100%") and "grammar" not in arm,
            "**Samplers, trigger in every prompt** (alpha 0.1, single tokens)",
        ),
    ),
    Generated("feature_tests.discovery_calibration", SOURCES, calibration),
    Generated("feature_tests.discovery_controls", SOURCES, controls),
    Generated("feature_tests.discovery_confirmation", SOURCES, confirmation),
    Generated("feature_tests.discovery_tuning", SOURCES, tuning),
]
