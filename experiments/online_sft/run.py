"""The Online SFT study on the offline arithmetic task (see README.md beside this file).

    .venv/bin/python experiments/online_sft/run.py              # every arm, 2 at a time
    .venv/bin/python experiments/online_sft/run.py --jobs 1     # one run at a time
    .venv/bin/python experiments/online_sft/run.py --report     # README tables from the store
    .venv/bin/python experiments/online_sft/run.py --check      # README == store?

Every choice is made on the dev split (data=arithmetic_heldout): each base's tau_eval (SePT's
protocol, by AVG), each arm's learning rate (one grid for every arm, seed 0, extended past an
edge) and its stopping step (the validation with the best mean dev pass@1 over the seeds). The
test split is read only at the chosen step, and at the step of an equal generated-token budget.
Runs are `train.py` processes (one thread each, `--jobs` at a time) under --out; a finished run
is reused, so a killed study resumes. Each run remembers the commit it was launched from; the
records (results/records.jsonl) carry it, and `--check` fails if two rows differ in code.
"""

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from osftkit.results.report import Column, Generated, Paired, Table, report_or_check
from osftkit.results.stats import paired_difference
from osftkit.results.store import ResultStore, config_hash, git_state

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STORE = ResultStore(HERE / "results")
TEST, DEV = "arithmetic", "dev"  # the validation sets' names in data=arithmetic_heldout
GRID = (3e-5, 1e-4, 3e-4)  # every arm's learning rates; one more is tried past a winning edge
RESPONSES = 12_800  # each arm's generation budget: Online SFT's 200 steps x 64 prompts
VALIDATIONS = 4  # per run, evenly spaced, the last at the final step
BASE_SEEDS = (0, 1, 2, 3, 4)  # the bases' evaluation (sampling) seeds
EQUIVALENCE = 0.03  # "level with": the 95% interval of the difference inside +-3 points
OSFT = "Online SFT (tau_s 0.6, tau_t 1)"


@dataclass(frozen=True)
class Arm:
    """A trained row: its preset overrides, seeds, responses generated per optimiser step and
    the paper's figure where it has one."""

    overrides: tuple[str, ...]
    seeds: int
    responses_per_step: int = 64
    base: str = "arith_base"
    paper: str = "-"

    @property
    def steps(self) -> int:
        """Steps that generate the shared budget (SFT and the offline set: Online SFT's)."""
        return RESPONSES // self.responses_per_step // VALIDATIONS * VALIDATIONS


# In the order the study completes them (the rows of the tables too): the arms the issue asks
# 5 seeds of first, then the 3-seed arms in the order their predictions need them.
ARMS = {
    OSFT: Arm(("experiment=osft_arith",), 5, paper="39.5 (annealed, 3 epochs)"),
    "coupled (tau_s = tau_t = 1)": Arm(("experiment=osft_coupled_arith",), 5, paper="19.3"),
    "offline (one frozen set, then SFT)": Arm(("experiment=osft_offline_arith",), 5, paper="21.0"),
    "GRPO (G = 8)": Arm(("experiment=grpo_arith",), 5, 128, paper="43.8 (8x OSFT's tokens)"),
    "EM-FT (entropy minimisation)": Arm(("experiment=em_ft_arith",), 3, paper="51.3 vs 55.0"),
    "SFT on gold solutions": Arm(("experiment=sft_arith",), 3),
    "Online SFT from the under-trained base": Arm(
        ("experiment=osft_arith", "model=arith_base_undertrained"),
        3,
        base="arith_base_undertrained",
        paper="no gain (Llama-3.1-8B-Instruct)",
    ),
    "tau_s annealed 0.6 -> 1": Arm(("experiment=osft_anneal_arith",), 3, paper="39.5"),
    "Online SFT, G = 4": Arm(("experiment=osft_g4_arith",), 3, 256, paper="above the base"),
    "Online SFT, G = 8": Arm(("experiment=osft_g8_arith",), 3, 512, paper="highest peak"),
    "Dr. GRPO (G = 8)": Arm(("experiment=dr_grpo_arith",), 3, 128),
    "DAPO (G = 8)": Arm(("experiment=dapo_arith",), 3, 128),
}
BASES = {"arith_base": "base", "arith_base_undertrained": "under-trained base"}


# ---- running ----------------------------------------------------------------------------------
def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def lr_text(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def run_overrides(arm: Arm, lr: float, seed: int, out: Path) -> list[str]:
    steps = arm.steps
    return [
        *arm.overrides,
        f"method.optimizer.lr={lr}",
        f"seed={seed}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps // VALIDATIONS}",
        f"paths.output_dir={out}",
        "callbacks.progress_bar=null",
        "callbacks.model_checkpoint=null",
        "callbacks.step_checkpoint=null",
        "validate_before_fit=false",
        "validate_after_fit=false",
        "+callbacks.validation_outcomes._target_=osftkit.results.outcomes.ValidationOutcomes",
        f"+callbacks.validation_outcomes.dirpath={out / 'outcomes'}",
    ]


def finished(out: Path, steps: int) -> bool:
    return (out / "outcomes" / f"step{steps}.json").exists() and (out / "stamp.json").exists()


def execute(script: str, overrides: list[str], out: Path) -> None:
    """`script` (train.py or eval.py) as a process with one torch thread, in a fresh `out`;
    the commit and config hash it ran with go to `out`/stamp.json, its output to run.log."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    commit, dirty = git_state(ROOT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OSFTKIT_ROOT": str(ROOT)}
    with (out / "run.log").open("w") as log:
        done = subprocess.run(
            [sys.executable, str(ROOT / script), *overrides],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed (rc {done.returncode}); see {out / 'run.log'}")
    digest = resolved_hash(overrides, script.removesuffix(".py"))
    (out / "stamp.json").write_text(
        json.dumps({"commit": commit, "dirty": dirty, "config_hash": digest})
    )
    print(f"done: {out}", flush=True)


def launch(overrides: list[str], out: Path, steps: int) -> Path:
    """One training run unless `out` holds it finished."""
    if not finished(out, steps):
        execute("train.py", overrides, out)
    return out


HYDRA = threading.Lock()  # Hydra's compose uses global state: one thread at a time


def resolved_hash(overrides: list[str], config_name: str = "train") -> str:
    """Hash of the run's resolved config, without the outcome-recording callback's path."""
    from omegaconf import OmegaConf

    import osftkit.recipes  # noqa: F401  (the methods' schemas, before Hydra composes)
    from osftkit.train import compose_train_config

    kept = [o for o in overrides if not o.startswith("+callbacks")]
    with HYDRA:
        cfg = compose_train_config(kept, config_name)
        return config_hash(OmegaConf.to_container(cfg, resolve=True))


def run_dir(out: Path, name: str, lr: float, seed: int) -> Path:
    return out / slug(name) / f"lr{lr_text(lr)}" / f"seed{seed}"


def run_all(jobs: list[Callable[[], Path]], workers: int) -> list[Path]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: job(), jobs))


# ---- reading a run --------------------------------------------------------------------------
def scalars(out: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of a run's validation scalars (TensorBoard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    tags = [t for t in accumulator.Tags()["scalars"] if t.startswith("val/")]
    return {t: {e.step: e.value for e in accumulator.Scalars(t)} for t in tags}


def curve(out: Path) -> list[dict[str, float]]:
    """Per validation: step, tokens generated, and dev and test pass@1, pass@8, greedy acc."""
    from osftkit.results.outcomes import read_validation_outcomes

    values = scalars(out)
    rows = []
    for step in sorted(read_validation_outcomes(out / "outcomes")):
        # Lightning logs a validation after optimiser step N at logger step N - 1.
        row = {"step": step, "tokens": values.get("val/tokens_generated", {}).get(step - 1, 0.0)}
        for split in (DEV, TEST):
            for metric in ("pass@1", "pass@8", "greedy_acc", "entropy"):
                row[f"{split}/{metric}"] = values[f"val/{split}/{metric}"][step - 1]
        rows.append(row)
    return rows


def outcomes_at(out: Path, step: int, split: str = TEST) -> list[dict[str, Any]]:
    return json.loads((out / "outcomes" / f"step{step}.json").read_text())[split]


def stamp(out: Path) -> dict[str, Any]:
    return json.loads((out / "stamp.json").read_text())


# ---- choices on the dev split ---------------------------------------------------------------
def best_on_dev(points: list[dict[str, float]]) -> dict[str, float]:
    """The validation with the highest dev pass@1 (the earliest among ties)."""
    return max(sorted(points, key=lambda p: p["step"]), key=lambda p: p[f"{DEV}/pass@1"])


def choose_lr(curves: dict[float, list[dict[str, float]]]) -> float:
    return max(sorted(curves), key=lambda lr: best_on_dev(curves[lr])[f"{DEV}/pass@1"])


def next_lr(curves: dict[float, list[dict[str, float]]]) -> float | None:
    """One more grid point past the winning edge (none when the winner is inside the grid)."""
    tried, chosen = sorted(curves), choose_lr(curves)
    if chosen == tried[-1]:
        return float(lr_text(tried[-1] * (tried[-1] / tried[-2])))
    if chosen == tried[0]:
        return float(lr_text(tried[0] / (tried[1] / tried[0])))
    return None


def mean_curve(curves: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    length = min(len(c) for c in curves)
    return [
        {k: float(np.mean([c[i][k] for c in curves])) for k in curves[0][i]} for i in range(length)
    ]


def tuned(curves: dict[float, list[dict[str, float]]]) -> bool:
    """Whether an arm's rate is chosen: the whole grid ran, and the winner is inside it or two
    points past its edge were tried (a resumed study tries no more)."""
    if not set(GRID) <= set(curves):
        return False
    return next_lr(curves) is None or len(curves) >= len(GRID) + 2


def grid_curves(out: Path, name: str) -> dict[float, list[dict[str, float]]]:
    return {lr: curve(path) for lr, path in grid_dirs(out, name).items()}


def complete_arm(name: str, out: Path) -> float:
    """One arm from start to end, one run at a time: its grid (seed 0), up to two more rates
    past a winning edge, then its other seeds at the rate chosen on dev. Returns the rate."""
    arm = ARMS[name]
    for lr in GRID:
        run_job(name, arm, lr, 0, out)()
    while not tuned(grid_curves(out, name)):
        run_job(name, arm, next_lr(grid_curves(out, name)), 0, out)()
    lr = choose_lr(grid_curves(out, name))
    print(f"{name}: lr {lr_text(lr)} chosen on dev", flush=True)
    for seed in range(1, arm.seeds):
        run_job(name, arm, lr, seed, out)()
    return lr


def run_job(name: str, arm: Arm, lr: float, seed: int, out: Path) -> Callable[[], Path]:
    path = run_dir(out, name, lr, seed)
    return lambda: launch(run_overrides(arm, lr, seed, path), path, arm.steps)


def grid_dirs(out: Path, name: str) -> dict[float, Path]:
    """lr -> seed-0 run directory of every finished grid point of an arm."""
    found = {}
    for path in (out / slug(name)).glob("lr*/seed0"):
        lr = float(path.parent.name.removeprefix("lr"))
        if (path / "stamp.json").exists():
            found[lr] = path
    return found


# ---- the bases ---------------------------------------------------------------------------------
def base_eval(model: str, overrides: list[str], out: Path) -> Path:
    """eval.py on a base with the arithmetic test split (unless `out` holds it); its
    per-problem record in `out`/store."""
    if not ((out / "eval.csv").exists() and (out / "stamp.json").exists()):
        execute(
            "eval.py",
            [
                f"model={model}",
                *overrides,
                f"paths.output_dir={out}",
                f"store={out / 'store'}",
                "callbacks.progress_bar=null",
                "logger=none",
            ],
            out,
        )
    return out


def base_taus(out: Path, workers: int) -> dict[str, float]:
    """Each base's tau_eval, chosen on the dev split by AVG (protocol=base_tau_sweep_arith)."""
    sweeps = [
        lambda m=model: base_eval(m, ["protocol=base_tau_sweep_arith"], out / m / "dev_sweep")
        for model in BASES
    ]
    paths = run_all(sweeps, workers)
    return {
        m: json.loads((p / "base_tau.json").read_text())["tau_eval"]
        for m, p in zip(BASES, paths, strict=True)
    }


def base_rows(chosen: dict[str, float]) -> dict[tuple[str, str], float]:
    """(model, row label) -> tau_eval: the test split at tau_eval 1, at 0.6 (Online SFT's
    tau_s), at 0 (greedy) and at the tau chosen on dev (a row of its own even when it equals
    one of the others)."""
    rows = {}
    for model, tau in chosen.items():
        base = BASES[model]
        rows[model, f"{base} at tau_eval 1"] = 1.0
        rows[model, f"{base} at tau_eval 0.6"] = 0.6
        rows[model, f"{base}, greedy (tau_eval 0)"] = 0.0
        rows[model, f"{base} at its dev-chosen tau_eval ({tau:g})"] = tau
    return rows


def base_dir(out: Path, model: str, tau: float, seed: int) -> Path:
    """Rows of one base at the same tau share their evaluations (the same config)."""
    return out / model / f"tau{tau:g}" / f"seed{seed}"


def base_job(model: str, tau: float, seed: int, path: Path) -> Callable[[], Path]:
    return lambda: base_eval(model, [f"validation.tau_eval={tau}", f"seed={seed}"], path)


def base_jobs(chosen: dict[str, float], out: Path) -> list[Callable[[], Path]]:
    return [
        base_job(model, tau, seed, base_dir(out, model, tau, seed))
        for model, tau in dict.fromkeys((m, t) for (m, _), t in base_rows(chosen).items())
        for seed in BASE_SEEDS
    ]


# ---- records ----------------------------------------------------------------------------------
def record_bases(chosen: dict[str, float], out: Path) -> None:
    """The bases' test evaluations: one record per (row, seed) in the plateau and the
    equal-token tables (a base does not train: the same rows in both)."""
    for (model, label), tau in base_rows(chosen).items():
        for seed in BASE_SEEDS:
            path = base_dir(out, model, tau, seed)
            made = ResultStore(path / "store").records()[-1]
            s = stamp(path)
            for table in ("online_sft.plateau", "online_sft.tokens"):
                STORE.add(
                    table=table,
                    arm=label,
                    seed=seed,
                    config_hash=s["config_hash"],
                    base_model=model,
                    metrics={
                        "test/pass@1": made["metrics"]["val/pass@1"],
                        "test/pass@8": made["metrics"]["val/pass@8"],
                        "test/greedy_acc": made["metrics"]["val/greedy_acc"],
                        "tau_eval": tau,
                        "step": 0,
                        "tokens": 0,
                    },
                    problems=made["problems"],
                    measured_at=(s["commit"], s["dirty"]),
                )


def record_base_sweeps(chosen: dict[str, float], out: Path) -> None:
    """Each base's dev sweep over tau_eval (the table its tau was chosen from), and its plot."""
    for model, tau_chosen in chosen.items():
        sweep = out / model / "dev_sweep"
        s = stamp(sweep)
        with (sweep / "dev_sweep" / "eval.csv").open() as handle:
            rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
        for row in rows:
            tau = row["tau_eval"]
            STORE.add(
                table="online_sft.base_dev",
                arm=f"{BASES[model]} @ tau_eval {tau:g}"
                + (" (chosen)" if tau == tau_chosen else ""),
                seed=0,
                config_hash=s["config_hash"],
                base_model=model,
                metrics={f"dev/{k.removeprefix('val/')}": v for k, v in row.items()},
                measured_at=(s["commit"], s["dirty"]),
            )
        shutil.copy(sweep / "dev_sweep" / "tau_sweep.png", HERE / f"{model}_dev_tau_sweep.png")


def record_grid(name: str, arm: Arm, out: Path, chosen_lr: float) -> None:
    """Seed 0's dev curve of every learning rate the arm tried (the dev grid table)."""
    for lr, path in sorted(grid_dirs(out, name).items()):
        points = curve(path)
        best = best_on_dev(points)
        half = [p for p in points if p["step"] >= points[-1]["step"] / 2]
        s = stamp(path)
        STORE.add(
            table="online_sft.dev_grid",
            arm=f"{name} @ lr {lr_text(lr)}" + (" (chosen)" if lr == chosen_lr else ""),
            seed=0,
            config_hash=s["config_hash"],
            base_model=arm.base,
            metrics={
                "lr": lr,
                "dev/pass@1 best": best[f"{DEV}/pass@1"],
                "best step": best["step"],
                "dev/pass@1 end": points[-1][f"{DEV}/pass@1"],
                "dev gain, 2nd half": points[-1][f"{DEV}/pass@1"] - half[0][f"{DEV}/pass@1"],
            },
            extra={"curve": points},
            measured_at=(s["commit"], s["dirty"]),
        )


def token_budget(out: Path, lrs: dict[str, float]) -> float:
    """The equal-token budget: the tokens Online SFT generates in its run (mean over seeds);
    every online arm generates about as many responses."""
    paths = seed_dirs(out, OSFT, ARMS[OSFT], lrs[OSFT])
    return float(np.mean([curve(p)[-1]["tokens"] for p in paths]))


def seed_dirs(out: Path, name: str, arm: Arm, lr: float) -> list[Path]:
    """The arm's finished seeds at `lr` (all of them, unless the study was stopped early)."""
    paths = [run_dir(out, name, lr, s) for s in range(arm.seeds)]
    return [p for p in paths if finished(p, arm.steps)]


def closest_to(points: list[dict[str, float]], budget: float) -> dict[str, float]:
    """The validation whose generated tokens are closest to `budget`; among equally close ones
    the latest, so that an arm that stops generating (the offline set, gold SFT) is read at
    its end."""
    return min(points, key=lambda p: (abs(p["tokens"] - budget), -p["step"]))


def record_arm(name: str, arm: Arm, lr: float, out: Path, budget: float) -> None:
    """The arm's seeds at its chosen lr: test at the step chosen on the mean dev curve
    (online_sft.plateau) and at its validation closest to the token budget (online_sft.tokens)."""
    paths = seed_dirs(out, name, arm, lr)
    curves = [curve(p) for p in paths]
    stop = int(best_on_dev(mean_curve(curves))["step"])
    for path, points in zip(paths, curves, strict=True):
        seed = int(path.name.removeprefix("seed"))
        closest = closest_to(points, budget)
        s = stamp(path)
        for table, point in (
            ("online_sft.plateau", stop),
            ("online_sft.tokens", closest["step"]),
        ):
            at = next(p for p in points if p["step"] == point)
            STORE.add(
                table=table,
                arm=name,
                seed=seed,
                config_hash=s["config_hash"],
                base_model=arm.base,
                metrics={
                    **{f"test/{m}": at[f"{TEST}/{m}"] for m in ("pass@1", "pass@8", "greedy_acc")},
                    "dev/pass@1": at[f"{DEV}/pass@1"],
                    "lr": lr,
                    "step": point,
                    "tokens": at["tokens"],
                },
                problems=outcomes_at(path, point),
                extra={"curve": points},
                measured_at=(s["commit"], s["dirty"]),
            )


def started(log: Path) -> float:
    """The time of a run log's first line (its process's start)."""
    first = log.open().readline()
    return time.mktime(time.strptime(first[1:20], "%Y-%m-%d %H:%M:%S"))


def record_cost(out: Path) -> None:
    """The study's wall time (first process start to last process end) and its runs' summed
    process time, from the run directories."""
    stamps = list(out.rglob("stamp.json"))
    starts = [started(s.parent / "run.log") for s in stamps]
    ends = [s.stat().st_mtime for s in stamps]
    made = [json.loads(s.read_text()) for s in stamps]
    first = min(made, key=lambda m: m["commit"] != made[0]["commit"])["commit"]
    STORE.add(
        table="online_sft.cost",
        arm="the whole study",
        seed=None,
        config_hash="-",
        base_model="-",
        metrics={
            "processes": len(stamps),
            "wall_s": max(ends) - min(starts),
            "process_s": sum(e - s for s, e in zip(starts, ends, strict=True)),
        },
        # Its runs' commits differ only outside src/ and configs/ (--check compares the rows).
        measured_at=(first, any(m["dirty"] for m in made)),
    )


def render_cost(records: list[dict[str, Any]]) -> str:
    found = [r["metrics"] for r in records if r["table"] == "online_sft.cost"]
    if not found:
        return "Not run yet.\n"
    cost = found[-1]
    return (
        f"{cost['processes']:.0f} processes (training runs and evaluations), two at a time with "
        f"one torch thread each on 2 CPU cores: {cost['wall_s'] / 3600:.2f} hours of wall time "
        f"({cost['process_s'] / 3600:.2f} process-hours). Generated from the store; do not edit.\n"
    )


# ---- tables -------------------------------------------------------------------------------------
def outcome_table(name: str, caption: str) -> Table:
    return Table(
        name,
        [
            Column("test pass@1 (tau_eval 1)", "test/pass@1"),
            Column("greedy acc", "test/greedy_acc"),
            Column("pass@8", "test/pass@8"),
            Column("lr (1e-4)", "lr", scale=1e4, digits=2, interval=False),
            Column("step", "step", digits=0, interval=False),
            Column("tokens generated", "tokens", digits=0, interval=False),
            Column("paper pass@1 (%)", label_key="paper"),
        ],
        caption=caption,
        problem_fields={"test/pass@1": "correct"},
        labels={name: {"paper": arm.paper} for name, arm in ARMS.items()},
    )


@dataclass(frozen=True)
class Prediction:
    """A prediction stated before the study ran: `first` compared with `second` in `table`
    ('above': the 95% interval of first - second is above 0; 'level': inside +-EQUIVALENCE;
    'not above': its lower end is at or below 0)."""

    text: str
    table: str
    first: str
    second: str
    relation: str


GREEDY = "base, greedy (tau_eval 0)"
BASE_AT_1 = "base at tau_eval 1"
PLATEAU, TOKENS = "online_sft.plateau", "online_sft.tokens"
COUPLED, OFFLINE = "coupled (tau_s = tau_t = 1)", "offline (one frozen set, then SFT)"
PREDICTIONS = [
    Prediction(
        "P1. Online SFT ends above the base at tau_eval 1.", PLATEAU, OSFT, BASE_AT_1, "above"
    ),
    Prediction(
        "P2. Coupled temperatures stay level with the base at tau_eval 1 (expected gradient 0).",
        PLATEAU,
        COUPLED,
        BASE_AT_1,
        "level",
    ),
    Prediction(
        "P3. The offline variant levels off near the base at tau_eval = tau_s = 0.6.",
        PLATEAU,
        OFFLINE,
        "base at tau_eval 0.6",
        "level",
    ),
    Prediction("P4. Online SFT ends above the offline variant.", PLATEAU, OSFT, OFFLINE, "above"),
    Prediction(
        "P5. Online SFT sharpens toward the base's greedy accuracy, not past it.",
        PLATEAU,
        OSFT,
        GREEDY,
        "not above",
    ),
    Prediction(
        "P6. EM-FT sharpens like Online SFT (level with it).",
        PLATEAU,
        "EM-FT (entropy minimisation)",
        OSFT,
        "level",
    ),
    Prediction(
        "P7. GRPO (with a reward) ends above Online SFT at equal generated tokens.",
        TOKENS,
        "GRPO (G = 8)",
        OSFT,
        "above",
    ),
    Prediction(
        "P8. Annealing tau_s to 1 ends below Online SFT at equal tokens.",
        TOKENS,
        OSFT,
        "tau_s annealed 0.6 -> 1",
        "above",
    ),
    Prediction(
        "P9. At equal tokens G = 4 is not above G = 1.",
        TOKENS,
        "Online SFT, G = 4",
        OSFT,
        "not above",
    ),
    Prediction(
        "P10. At equal tokens G = 8 is not above G = 1.",
        TOKENS,
        "Online SFT, G = 8",
        OSFT,
        "not above",
    ),
    Prediction(
        "P11. SFT on gold solutions ends above Online SFT.",
        PLATEAU,
        "SFT on gold solutions",
        OSFT,
        "above",
    ),
    Prediction(
        "P12. Online SFT does not beat the base at its dev-chosen tau_eval.",
        PLATEAU,
        OSFT,
        "base at its dev-chosen tau_eval",
        "not above",
    ),
    Prediction(
        "P13. From the under-trained base, Online SFT does not beat that base at its dev-chosen "
        "tau_eval (the paper's failure case).",
        PLATEAU,
        "Online SFT from the under-trained base",
        "under-trained base at its dev-chosen tau_eval",
        "not above",
    ),
]


def grids(
    records: list[dict[str, Any]], table: str, first: str, second: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """(seeds, problems) pass@1 grids of two rows of `table` ('second' may be a row's prefix:
    a base's dev-chosen row names its tau), on the seeds both have."""

    def rows(label: str) -> dict[int, np.ndarray]:
        found = [r for r in records if r["table"] == table and r["arm"].startswith(label)]
        return {r["seed"]: np.array([p["correct"] / p["n"] for p in r["problems"]]) for r in found}

    a, b = rows(first), rows(second)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return np.stack([a[s] for s in seeds]), np.stack([b[s] for s in seeds])


def verdict(prediction: Prediction, records: list[dict[str, Any]]) -> str:
    pair = grids(records, prediction.table, prediction.first, prediction.second)
    if pair is None:
        return f"| {prediction.text} | - | not measured |"
    estimate = paired_difference(*pair)
    low, high = estimate.low, estimate.high
    held = {
        "above": low > 0,
        "level": low >= -EQUIVALENCE and high <= EQUIVALENCE,
        "not above": low <= 0,
    }[prediction.relation]
    seeds = pair[0].shape[0]
    cell = f"{100 * estimate.mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] ({seeds} seeds)"
    return f"| {prediction.text} | {cell} | {'held' if held else 'FAILED'} |"


def render_verdicts(records: list[dict[str, Any]]) -> str:
    lines = [
        "| prediction (stated before the runs) | first - second, pass@1 points [95% interval] "
        "| verdict |",
        "|---|---|---|",
        *(verdict(p, records) for p in PREDICTIONS),
        "",
        f"'above': the interval is above 0; 'level': inside +-{100 * EQUIVALENCE:g} points; "
        "'not above': its lower end is at or below 0. Paired over the seeds both rows have and "
        "the 256 test problems (hierarchical bootstrap). Generated from the store; do not edit.",
    ]
    return "\n".join(lines) + "\n"


DEV_COLUMNS = [
    Column("dev pass@1 at its best step", "dev/pass@1 best"),
    Column("best step", "best step", digits=0, interval=False),
    Column("dev pass@1 at the end", "dev/pass@1 end"),
    Column("dev gain over the 2nd half", "dev gain, 2nd half"),
]
TABLES = [
    Table(
        "online_sft.base_dev",
        [
            Column("dev pass@1", "dev/pass@1"),
            Column("dev pass@8", "dev/pass@8"),
            Column("dev AVG", "dev/avg"),
            Column("dev greedy acc", "dev/greedy_acc"),
        ],
        counts=False,
        caption="**Each base's tau_eval on the dev split** (one evaluation per tau, n = 8; "
        "chosen by AVG, SePT's criterion).",
    ),
    Table(
        "online_sft.dev_grid",
        DEV_COLUMNS,
        counts=False,
        caption="**Learning rates on the dev split** (seed 0, one run per row; no interval): "
        "each arm's grid, the chosen one marked. 'dev gain over the 2nd half': dev pass@1 at the "
        "end minus at the first validation of the run's second half (near 0: a plateau).",
    ),
    outcome_table(
        "online_sft.plateau",
        "**At the plateau**: each arm at its dev-chosen learning rate, scored on the test split "
        "at the step where its mean dev pass@1 over the seeds peaked; the bases at tau_eval 1, "
        "0.6, 0 (greedy) and the tau chosen on dev, over 5 evaluation seeds.",
    ),
    outcome_table(
        "online_sft.tokens",
        "**At equal generated tokens**: each arm at its validation closest to the tokens Online "
        "SFT generates in its run (every online arm generates about as many responses); the "
        "offline set and gold SFT generate less and are read at their ends.",
    ),
    Paired(
        "online_sft.paired",
        source="online_sft.plateau",
        reference=OSFT,
        outcomes=[("test pass@1 - Online SFT's (points)", "correct")],
        rows=tuple(ARMS),
        caption="**Paired differences at the plateau**, each row minus Online SFT.",
        scale=100,
    ),
    Generated("online_sft.verdicts", ("online_sft.plateau", "online_sft.tokens"), render_verdicts),
    Generated("online_sft.cost", ("online_sft.cost",), render_cost),
]


# ---- the plot -----------------------------------------------------------------------------------
def plot(records: list[dict[str, Any]]) -> None:
    """Dev pass@1 against optimiser steps and against generated tokens (mean over seeds, each
    arm at its chosen lr), and every arm's learning-rate grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in records if r["table"] == "online_sft.plateau" and r.get("extra")]
    start = {  # each base's dev pass@1 at tau_eval 1: every curve's step 0
        r["base_model"]: r["metrics"]["dev/pass@1"]
        for r in records
        if r["table"] == "online_sft.base_dev" and r["metrics"]["dev/tau_eval"] == 1.0
    }
    figure, axes = plt.subplots(1, 2, figsize=(14, 5))
    for index, name in enumerate(ARMS):
        curves = [r["extra"]["curve"] for r in chosen if r["arm"] == name]
        if not curves:
            continue
        origin = {"step": 0.0, "tokens": 0.0, f"{DEV}/pass@1": start.get(ARMS[name].base)}
        mean = (
            [origin, *mean_curve(curves)]
            if origin[f"{DEV}/pass@1"] is not None
            else mean_curve(curves)
        )
        for axis, key in zip(axes, ("step", "tokens"), strict=True):
            if key == "tokens" and mean[-1]["tokens"] == 0:
                continue
            axis.plot(
                [p[key] for p in mean],
                [p[f"{DEV}/pass@1"] for p in mean],
                marker="o",
                ms=3,
                color=f"C{index % 10}",
                ls="-" if index < 10 else "--",
                label=name,
            )
    for axis, label in zip(axes, ("optimiser step", "tokens generated in training"), strict=True):
        axis.set_xlabel(label)
        axis.set_ylabel("dev pass@1 (tau_eval 1), mean over seeds")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    figure.tight_layout()
    figure.savefig(HERE / "pass1_curves.png", dpi=110)
    grid = [r for r in records if r["table"] == "online_sft.dev_grid"]
    names = list(dict.fromkeys(r["arm"].split(" @ ")[0] for r in grid))
    columns = 4
    figure, axes = plt.subplots(
        math.ceil(len(names) / columns),
        columns,
        figsize=(16, 3 * math.ceil(len(names) / columns)),
        squeeze=False,
    )
    for axis, name in zip(axes.flat, names, strict=False):
        for r in (r for r in grid if r["arm"].startswith(f"{name} @ ")):
            points = r["extra"]["curve"]
            axis.plot(
                [p["step"] for p in points],
                [p[f"{DEV}/pass@1"] for p in points],
                marker="o",
                ms=3,
                label=r["arm"].split(" @ ")[1],
            )
        axis.set_title(name, fontsize=8)
        axis.legend(fontsize=6)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(HERE / "lr_grid.png", dpi=90)


# ---- the study ----------------------------------------------------------------------------------
def study(out: Path, workers: int) -> None:
    """Bases first (their tau on dev, then the test scores), then the arms in ARMS order, each
    completed (grid, rate, seeds) before the next starts, `workers` arms at a time: a study
    stopped early holds whole arms. Finally the records and the plots."""
    chosen = base_taus(out, workers)
    print("base tau_eval chosen on dev:", chosen, flush=True)
    run_all(base_jobs(chosen, out), workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        lrs = dict(zip(ARMS, pool.map(lambda name: complete_arm(name, out), ARMS), strict=True))
    write_records(out, chosen, lrs)


def write_records(out: Path, chosen: dict[str, float], lrs: dict[str, float]) -> None:
    """The study's store, rebuilt from the run directories (each record stamped with the commit
    its run was launched from)."""
    STORE.path.unlink(missing_ok=True)
    record_cost(out)
    record_base_sweeps(chosen, out)
    record_bases(chosen, out)
    budget = token_budget(out, lrs)
    for name, arm in ARMS.items():
        if name in lrs:  # a study stopped early may not have reached every arm
            record_grid(name, arm, out, lrs[name])
            record_arm(name, arm, lrs[name], out, budget)
    plot(STORE.records())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "online_sft_study")
    parser.add_argument("--report", action="store_true", help="write the README's tables")
    parser.add_argument("--check", action="store_true", help="exit 1 if a README table is off")
    parser.add_argument(
        "--records",
        action="store_true",
        help="rebuild the store from the finished runs under --out without running more (a "
        "study stopped early: each row holds the seeds that finished)",
    )
    args = parser.parse_args()
    os.environ.setdefault("OSFTKIT_ROOT", str(ROOT))
    if args.report or args.check:
        mode = "report" if args.report else "check"
        readmes = [HERE / "README.md", ROOT / "README.md"]
        sys.exit(report_or_check(mode, readmes, "online_sft", TABLES, STORE.records(), ROOT))
    if args.records:
        write_records(args.out, *choices_made(args.out))
    else:
        study(args.out, args.jobs)


def choices_made(out: Path) -> tuple[dict[str, float], dict[str, float]]:
    """The bases' taus and the arms' learning rates the finished runs under `out` chose."""
    taus = {
        m: json.loads((out / m / "dev_sweep" / "base_tau.json").read_text())["tau_eval"]
        for m in BASES
    }
    lrs = {}
    for name in ARMS:
        curves = grid_curves(out, name)
        if tuned(curves):
            lrs[name] = choose_lr(curves)  # an arm whose grid is not finished has no rate yet
    return taus, lrs


if __name__ == "__main__":
    main()
