"""The Online SFT study on the offline arithmetic task (see README.md beside this file).

    .venv/bin/python experiments/online_sft/run.py                    # every arm, about 2 CPU hours
    .venv/bin/python experiments/online_sft/run.py --seeds 0          # one seed
    .venv/bin/python experiments/online_sft/run.py --arms EM-FT DAPO  # only these arms
    .venv/bin/python experiments/online_sft/run.py --report           # README tables from the store
    .venv/bin/python experiments/online_sft/run.py --check            # README == store?

Every arm is a preset of configs/experiment/ run through osftkit.train.run; each finished run
is a stamped record in results/records.jsonl (the store: a rerun skips what it holds), and the
README's tables are generated from the store. results.json keeps the curves for the plot.
"""

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import OmegaConf

from osftkit.results.report import Column, Table, report_or_check
from osftkit.results.store import ResultStore, config_hash

if TYPE_CHECKING:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
# Training, evaluation, TensorBoard and matplotlib are imported where a run needs them, so that
# --report and --check (the fast tests) start in seconds.

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STORE = ResultStore(HERE / "results")
TAU_SWEEP = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2]
COLUMNS = ["val/pass@1", "val/greedy_acc", "val/pass@8"]
OSFT = "OSFT (tau_s 0.6, tau_t 1)"


@dataclass(frozen=True)
class Arm:
    """A row of the table: the preset's overrides, whether it runs every seed or a few (the
    expensive and the under-trained-base arms), and the paper's pass@1 where it has one."""

    overrides: tuple[str, ...]
    few_seeds: bool = False
    paper: str = "-"


# The arms that generate more per step than OSFT (G x prompts > 64) stop once they have
# generated OSFT's 200 x 64 = 12,800 responses (the 8x arms: 24 x 512 = 12,288), so that on
# 2 CPU cores every row gets the same generation budget: compare them at equal tokens.
EQUAL_TOKENS = {
    128: ("trainer.max_steps=100", "trainer.val_check_interval=25"),  # 16 prompts x G = 8
    256: ("trainer.max_steps=50", "trainer.val_check_interval=25"),  # 64 prompts x G = 4
    512: ("trainer.max_steps=24", "trainer.val_check_interval=8"),  # 64 prompts x G = 8
}
# The paper's numbers: mean pass@1 (%) over six benchmarks on Qwen2.5-Math-7B (the revision).
ARMS = {
    OSFT: Arm(("experiment=osft_arith",), paper="39.5 (annealed, 3 epochs)"),
    "OSFT coupled (tau_s = tau_t = 1)": Arm(("experiment=osft_coupled_arith",), paper="19.3"),
    "GRPO (G = 8)": Arm(("experiment=grpo_arith",), paper="43.8 (at 8x OSFT's tokens)"),
    "SFT on gold solutions": Arm(("experiment=sft_arith",)),
    "OSFT from the under-trained base": Arm(
        ("experiment=osft_arith", "model=arith_base_undertrained"),
        few_seeds=True,
        paper="no gain on Llama-3.1-8B-Instruct",
    ),
    "GRPO from the under-trained base": Arm(
        ("experiment=grpo_arith", "model=arith_base_undertrained"), few_seeds=True
    ),
    "OSFT offline (one frozen self-generated set)": Arm(
        ("experiment=osft_offline_arith",), paper="21.0 (online 39.5)"
    ),
    "EM-FT (entropy minimisation)": Arm(
        ("experiment=em_ft_arith",), paper="51.3 (OSFT 55.0, Fig. 3's own average)"
    ),
    "OSFT tau_s annealed 0.6 -> 1": Arm(("experiment=osft_anneal_arith",), paper="39.5"),
    "Dr. GRPO (G = 8)": Arm(("experiment=dr_grpo_arith", *EQUAL_TOKENS[128]), few_seeds=True),
    "DAPO (G = 8)": Arm(("experiment=dapo_arith", *EQUAL_TOKENS[128]), few_seeds=True),
    "OSFT G = 4 (64 prompts)": Arm(
        ("experiment=osft_g4_arith", *EQUAL_TOKENS[256]),
        few_seeds=True,
        paper="above the base (Fig. 5)",
    ),
    "GRPO G = 8 on OSFT's 64 prompts": Arm(
        ("experiment=grpo_64x8_arith", *EQUAL_TOKENS[512]), few_seeds=True, paper="43.8"
    ),
    "OSFT G = 8 (64 prompts)": Arm(
        ("experiment=osft_g8_arith", *EQUAL_TOKENS[512]),
        few_seeds=True,
        paper="highest peak of G (Fig. 5)",
    ),
}


# The validation set of every recorded row: 256 problems, n = 8 samples at tau_eval 1.
VALIDATION = {"problems": 256, "samples": 8}
METRIC_COLUMNS = [
    Column("pass@1 (tau_eval 1)", "val/pass@1"),
    Column("greedy acc", "val/greedy_acc"),
    Column("pass@8", "val/pass@8"),
]
TABLES = [
    Table(
        "online_sft.bases",
        [
            Column("tau_eval", "tau_eval", digits=1),
            Column("pass@1", "val/pass@1"),
            *METRIC_COLUMNS[1:],
        ],
        caption="**The bases**, swept over tau_eval (`eval.py`); one evaluation each.",
    ),
    Table(
        "online_sft.main",
        [
            *METRIC_COLUMNS,
            Column("steps", "steps", digits=0, interval=False),
            Column("wall s", "wall_s", digits=0, interval=False),
            Column("tokens generated", "tokens", digits=0, interval=False),
            Column("paper pass@1 (%)", label_key="paper"),
        ],
        rows=tuple(ARMS),
        caption="**The arms**, metrics at each run's last step.",
        labels={name: {"paper": arm.paper} for name, arm in ARMS.items()},
    ),
]


def events(run_dir: Path) -> "EventAccumulator":
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Runs of earlier revisions wrote their samples one step ahead of the validation's
    # scalars; without purge_orphaned_data=False the reader drops every later point.
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), purge_orphaned_data=False)
    accumulator.Reload()
    return accumulator


def scalars(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    accumulator = events(run_dir)
    if tag not in accumulator.Tags()["scalars"]:
        return [], []
    points = accumulator.Scalars(tag)
    return [p.step for p in points], [p.value for p in points]


def summary(run_dir: Path) -> dict:
    """Final validation metrics, generated tokens, wall time and the curve (step, pass@1,
    tokens, seconds) at every validation. Seconds count from the logger's first event, written
    just before `fit`: they include the offline set's generation, not the data tokenising."""
    accumulator = events(run_dir)
    final = {tag: accumulator.Scalars(tag)[-1].value for tag in COLUMNS}
    start = accumulator.FirstEventTimestamp()
    times = [e.wall_time for tag in accumulator.Tags()["scalars"] for e in accumulator.Scalars(tag)]
    passes = accumulator.Scalars("val/pass@1")
    _, tokens = scalars(run_dir, "val/tokens_generated")
    tokens = tokens or [0.0] * len(passes)
    curve = [[p.step, p.value, t, p.wall_time - start] for p, t in zip(passes, tokens, strict=True)]
    return {**final, "wall_s": max(times) - start, "tokens": tokens[-1], "curve": curve}


def run_arm(overrides: tuple[str, ...], seed: int, out: Path) -> dict:
    """Run one arm unless a finished run is already in `out` (so the study can be resumed)."""
    from osftkit.train import compose_train_config, run

    # The bases are evaluated once by the sweep; the last validation falls on the last step.
    cfg = compose_train_config(
        [
            *overrides,
            f"seed={seed}",
            f"paths.output_dir={out}",
            "callbacks.progress_bar=null",
            "validate_before_fit=false",
            "validate_after_fit=false",
        ]
    )
    steps, _ = scalars(out, "val/pass@1") if (out / "tensorboard").exists() else ([], [])
    if not steps or steps[-1] < cfg.trainer.max_steps - 1:
        if out.exists():
            shutil.rmtree(out)
        run(cfg)
    return summary(out)


def record_arm(name: str, overrides: tuple[str, ...], seed: int, out: Path) -> dict:
    """Run an arm's seed unless the store holds it (same config hash), and record it."""
    from osftkit.train import compose_train_config

    cfg = compose_train_config([*overrides, f"seed={seed}"])
    digest = config_hash(OmegaConf.to_container(cfg, resolve=True))
    recorded = STORE.find(name, seed, digest)
    if recorded:
        return {**recorded["metrics"], "curve": recorded.get("extra", {}).get("curve")}
    result = run_arm(overrides, seed, out)
    STORE.add(
        table="online_sft.main",
        arm=name,
        seed=seed,
        config_hash=digest,
        base_model=str(cfg.model.get("path") or cfg.model.get("name", "")),
        metrics={**metric_values(result), "steps": cfg.trainer.max_steps},
        counts=VALIDATION,
        extra={"curve": result["curve"]},
        root=ROOT,
    )
    return result


def metric_values(result: dict) -> dict[str, float]:
    return {k: v for k, v in result.items() if k != "curve"}


def base_rows(model: str, out: Path) -> list[dict]:
    """The tau_eval sweep of a base model (read back from eval.csv when it already ran)."""
    from osftkit.evaluate import evaluate
    from osftkit.train import compose_train_config

    if (out / "eval.csv").exists():
        with (out / "eval.csv").open() as handle:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    sweep = ",".join(str(tau) for tau in TAU_SWEEP)
    overrides = [
        f"model={model}",
        "callbacks.progress_bar=null",
        "logger=none",
        f"paths.output_dir={out}",
        f"tau_sweep=[{sweep}]",
    ]
    rows = evaluate(compose_train_config(overrides, config_name="eval"))
    shutil.copy(out / "tau_sweep.png", HERE / f"{model}_tau_sweep.png")
    return rows


def sweep_bases(out: Path) -> dict[str, dict]:
    """Each base at tau_eval 1 and at its best tau_eval."""
    bases = {}
    for label, model in (("base", "arith_base"), ("under-trained base", "arith_base_undertrained")):
        sweep = base_rows(model, out / f"eval_{model}")
        best = max(sweep, key=lambda r: r["val/pass@1"])
        bases[f"{label} at tau_eval 1"] = next(r for r in sweep if r["tau_eval"] == 1.0)
        bases[f"{label} at its best tau_eval ({best['tau_eval']:.1f})"] = best
    return bases


def start_of(name: str, bases: dict[str, dict]) -> dict:
    return bases[f"{'under-trained base' if 'under-trained' in name else 'base'} at tau_eval 1"]


def mean_curve(rows: list[dict], start: dict) -> np.ndarray | None:
    """(validations + 1, 4) mean over seeds of (step, pass@1, tokens, seconds), from the base."""
    curves = [r["curve"] for r in rows if r.get("curve")]
    if not curves:
        return None
    length = min(len(c) for c in curves)
    mean = np.mean([np.asarray(c[:length], dtype=float) for c in curves], axis=0)
    return np.vstack([[0.0, start["val/pass@1"], 0.0, 0.0], mean])


def at_tokens(rows: list[dict], curve: np.ndarray | None, budget: float) -> str:
    """pass@1 at `budget` generated tokens, interpolated along the arm's curve; an arm that
    generated within 5% of the budget is read at its end; '-' for one that generated far less
    or far more without a recorded curve."""
    tokens = float(np.mean([r["tokens"] for r in rows]))
    if budget <= 0 or tokens < 0.95 * budget:
        return "-"
    if curve is None:
        close = tokens <= 1.05 * budget
        return f"{np.mean([r['val/pass@1'] for r in rows]):.3f}" if close else "-"
    return f"{np.interp(min(budget, tokens), curve[:, 2], curve[:, 1]):.3f}"


def mean_std(values: list[float]) -> str:
    return (
        f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"
    )


def table(results: dict[str, list[dict]], bases: dict[str, dict]) -> str:
    budget = np.mean([r["tokens"] for r in results[OSFT]]) if OSFT in results else 0.0
    lines = [
        "| run | seeds | steps | pass@1 (tau_eval 1) | greedy acc | pass@8 | wall s "
        f"| tokens generated | pass@1 at {budget / 1e3:,.0f}k tokens | paper pass@1 (%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in bases.items():
        paper = "22.7" if name.startswith("base at its best") else "-"
        lines.append(
            f"| {name} | - | - | {row['val/pass@1']:.3f} | {row['val/greedy_acc']:.3f} | "
            f"{row['val/pass@8']:.3f} | - | - | - | {paper} |"
        )
    for name, rows in results.items():
        cells = [mean_std([r[k] for r in rows]) for k in COLUMNS]
        wall, tokens = np.mean([r["wall_s"] for r in rows]), np.mean([r["tokens"] for r in rows])
        matched = at_tokens(rows, mean_curve(rows, start_of(name, bases)), budget)
        paper = ARMS[name].paper if name in ARMS else "-"
        steps = rows[0]["curve"][-1][0] + 1 if rows[0].get("curve") else 200  # old rows: 200
        lines.append(
            f"| {name} | {len(rows)} | {steps} | {' | '.join(cells)} | {wall:.0f} "
            f"| {tokens:,.0f} | {matched} | {paper} |"
        )
    return "\n".join(lines)


def plot_curves(results: dict[str, list[dict]], bases: dict[str, dict]) -> None:
    """pass@1 against optimiser steps, generated tokens and wall time, every arm. Arms whose
    rows predate the recorded curves are drawn as their final point (hollow marker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(20, 5))
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(results), 2)))
    for colour, (name, rows) in zip(colours, results.items(), strict=False):
        start = start_of(name, bases)
        curve = mean_curve(rows, start)
        for axis, column in zip(axes, (0, 2, 3), strict=True):
            if column == 2 and np.mean([r["tokens"] for r in rows]) == 0:
                continue  # SFT generates nothing: no point against tokens
            if curve is not None:
                axis.plot(curve[:, column], curve[:, 1], marker="o", ms=3, color=colour, label=name)
                continue
            final = {0: 200, 2: np.mean([r["tokens"] for r in rows])}.get(column)
            final = final if final is not None else np.mean([r["wall_s"] for r in rows])
            pass1 = np.mean([r["val/pass@1"] for r in rows])
            axis.plot([0, final], [start["val/pass@1"], pass1], ls=":", color=colour)
            axis.plot([final], [pass1], marker="o", mfc="none", color=colour, label=name)
    labels = ("optimiser step", "tokens generated in training", "wall time of the run (s)")
    for axis, label in zip(axes, labels, strict=True):
        axis.set_xlabel(label)
        axis.set_ylabel("val pass@1 (tau_eval 1)")
        axis.grid(alpha=0.3)
    axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    figure.tight_layout()
    figure.savefig(HERE / "pass1_curves.png", dpi=120)


# results.json's history: the commit at which each row's numbers entered the repository.
LEGACY_COMMITS = ("14b131f", "25d170c", "0c835db", "aa48c29", "8d22e3f", "4364f83", "af49aff")


def import_legacy() -> None:
    """Records (marked stale with their commit) of every row of the last results.json, each
    with the commit at which its numbers last changed; replaces the store's file."""
    rows, first = {}, {}
    for commit in LEGACY_COMMITS:
        shown = subprocess.run(
            ["git", "show", f"{commit}:experiments/online_sft/results.json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        saved = json.loads(shown)
        found = {("online_sft.bases", k): [v] for k, v in saved.get("bases", {}).items()}
        found |= {("online_sft.main", k): v for k, v in saved.get("runs", {}).items()}
        for key, value in found.items():
            if rows.get(key) != value:
                first[key] = commit
            rows[key] = value
    final = json.loads((HERE / "results.json").read_text())
    kept = {("online_sft.bases", k) for k in final["bases"]} | {
        ("online_sft.main", k) for k in final["runs"]
    }
    STORE.path.unlink(missing_ok=True)
    for (table, arm), runs in rows.items():
        if (table, arm) not in kept:
            continue
        for seed, result in enumerate(runs):
            steps = result["curve"][-1][0] + 1 if result.get("curve") else 200  # old rows: 200
            STORE.add(
                table=table,
                arm=arm,
                seed=seed if table == "online_sft.main" else None,
                config_hash="legacy",
                base_model="arith_base_undertrained" if "under-trained" in arm else "arith_base",
                metrics=metric_values(result)
                | ({"steps": steps} if table.endswith("main") else {}),
                counts=VALIDATION,
                stale=first[(table, arm)],
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--few-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="seeds of the expensive arms and of those that start from the under-trained base",
    )
    parser.add_argument(
        "--arms", nargs="+", default=[""], help="run only the arms whose name contains one of these"
    )
    parser.add_argument(
        "--sweep-bases",
        action="store_true",
        help="with --arms: sweep the bases again (after their recipe changed), not read them",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "online_sft_study")
    parser.add_argument("--report", action="store_true", help="write the README's tables")
    parser.add_argument("--check", action="store_true", help="exit 1 if a README table is off")
    parser.add_argument(
        "--import-legacy", action="store_true", help="rebuild the store from results.json's history"
    )
    args = parser.parse_args()
    os.environ.setdefault("OSFTKIT_ROOT", str(ROOT))
    if args.import_legacy:
        import_legacy()
    if args.report or args.check:
        mode = "report" if args.report else "check"
        readmes = [HERE / "README.md", ROOT / "README.md"]
        sys.exit(report_or_check(mode, readmes, "online_sft", TABLES, STORE.records(), ROOT))
    saved = (
        json.loads((HERE / "results.json").read_text()) if (HERE / "results.json").exists() else {}
    )
    everything = args.arms == [""]
    # A partial rerun keeps the saved base sweeps rather than rebuilding both bases.
    fresh_bases = everything or args.sweep_bases or "bases" not in saved
    bases = sweep_bases(args.out) if fresh_bases else saved["bases"]
    results = {} if everything else dict(saved.get("runs", {}))
    for name, arm in ARMS.items():
        if not any(pattern in name for pattern in args.arms):
            continue
        seeds = args.few_seeds if arm.few_seeds else args.seeds
        slug = re.sub(r"[^a-z0-9]+", "_", name.split(" (")[0].lower()).strip("_")
        results[name] = [
            record_arm(name, arm.overrides, seed, args.out / slug / f"seed{seed}") for seed in seeds
        ]
        results = {n: results[n] for n in ARMS if n in results}  # table order = ARMS order
        (HERE / "results.json").write_text(json.dumps({"bases": bases, "runs": results}, indent=1))
    plot_curves(results, bases)
    text = table(results, bases)
    print(text)
    (HERE / "results.md").write_text(
        f"Seeds: {args.seeds} (few-seed arms: {args.few_seeds})\n\n{text}\n"
    )


if __name__ == "__main__":
    main()
