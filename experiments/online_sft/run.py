"""The Online SFT study on the offline arithmetic task (see README.md beside this file).

    .venv/bin/python experiments/online_sft/run.py              # 3 seeds, about 1 CPU hour
    .venv/bin/python experiments/online_sft/run.py --seeds 0    # one seed

Every arm is a preset of configs/experiment/ run through osftkit.train.run; results, curves and
the table are written next to this file.
"""

import argparse
import csv
import json
import os
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from osftkit.evaluate import evaluate  # noqa: E402
from osftkit.train import compose_train_config, run  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TAU_SWEEP = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2]
ARMS = {  # name -> overrides (the study's rows)
    "OSFT (tau_s 0.6, tau_t 1)": ["experiment=osft_arith"],
    "OSFT coupled (tau_s = tau_t = 1)": ["experiment=osft_coupled_arith"],
    "GRPO (G = 8)": ["experiment=grpo_arith"],
    "SFT on gold solutions": ["experiment=sft_arith"],
    "OSFT from the under-trained base": ["experiment=osft_arith", "model=arith_base_undertrained"],
    "GRPO from the under-trained base": ["experiment=grpo_arith", "model=arith_base_undertrained"],
}
COLUMNS = ["val/pass@1", "val/greedy_acc", "val/pass@8"]


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return accumulator


def scalars(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    accumulator = events(run_dir)
    if tag not in accumulator.Tags()["scalars"]:
        return [], []
    points = accumulator.Scalars(tag)
    return [p.step for p in points], [p.value for p in points]


def summary(run_dir: Path) -> dict:
    """Final validation metrics, generated tokens and wall time (first to last logged event)."""
    accumulator = events(run_dir)
    final = {tag: accumulator.Scalars(tag)[-1].value for tag in COLUMNS}
    times = [e.wall_time for tag in accumulator.Tags()["scalars"] for e in accumulator.Scalars(tag)]
    _, tokens = scalars(run_dir, "val/tokens_generated")
    return {**final, "wall_s": max(times) - min(times), "tokens": tokens[-1] if tokens else 0}


def run_arm(overrides: list[str], seed: int, out: Path) -> dict:
    """Run one arm unless a finished run is already in `out` (so the study can be resumed)."""
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


def base_rows(model: str, out: Path) -> list[dict]:
    """The tau_eval sweep of a base model (read back from eval.csv when it already ran)."""
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
    return evaluate(compose_train_config(overrides, config_name="eval"))


def mean_std(values: list[float]) -> str:
    return (
        f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"
    )


def table(results: dict[str, list[dict]], bases: dict[str, dict]) -> str:
    lines = [
        "| run | pass@1 (tau_eval 1) | greedy acc | pass@8 | wall s | tokens generated |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in bases.items():
        lines.append(
            f"| {name} | {row['val/pass@1']:.3f} | {row['val/greedy_acc']:.3f} | "
            f"{row['val/pass@8']:.3f} | - | - |"
        )
    for name, rows in results.items():
        cells = [mean_std([r[k] for r in rows]) for k in COLUMNS]
        wall, tokens = np.mean([r["wall_s"] for r in rows]), np.mean([r["tokens"] for r in rows])
        lines.append(f"| {name} | {' | '.join(cells)} | {wall:.0f} | {tokens:,.0f} |")
    return "\n".join(lines)


def plot_curves(runs: dict[str, list[Path]], bases: dict[str, dict]) -> None:
    figure, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(11, 4))
    for name, dirs in runs.items():
        start = bases[
            f"{'under-trained base' if 'under-trained' in name else 'base'} at tau_eval 1"
        ]
        steps, _ = scalars(dirs[0], "val/pass@1")
        curves = [scalars(d, "val/pass@1")[1] for d in dirs]
        length = min(len(c) for c in curves)
        mean = [start["val/pass@1"], *np.mean([c[:length] for c in curves], axis=0)]
        (line,) = by_step.plot([0, *steps[:length]], mean, marker="o", label=name)
        tokens = scalars(dirs[0], "val/tokens_generated")[1][:length]
        if tokens and max(tokens) > 0:  # SFT generates nothing: no curve against tokens
            by_tokens.plot(
                [0, *tokens], mean[: len(tokens) + 1], marker="o", color=line.get_color()
            )
    for axis, label in ((by_step, "optimiser step"), (by_tokens, "tokens generated in training")):
        axis.set_xlabel(label)
        axis.set_ylabel("val pass@1 (tau_eval 1)")
        axis.grid(alpha=0.3)
    by_step.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(HERE / "pass1_curves.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--under-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="seeds of the arms that start from the under-trained base",
    )
    parser.add_argument("--only", default="", help="run only the arms whose name contains this")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "online_sft_study")
    args = parser.parse_args()
    os.environ.setdefault("OSFTKIT_ROOT", str(ROOT))
    bases = {}
    for label, model in (("base", "arith_base"), ("under-trained base", "arith_base_undertrained")):
        sweep = base_rows(model, args.out / f"eval_{model}")
        shutil.copy(args.out / f"eval_{model}" / "tau_sweep.png", HERE / f"{model}_tau_sweep.png")
        best = max(sweep, key=lambda r: r["val/pass@1"])
        at_one = next(r for r in sweep if r["tau_eval"] == 1.0)
        bases[f"{label} at tau_eval 1"] = at_one
        bases[f"{label} at its best tau_eval ({best['tau_eval']:.1f})"] = best
    results, dirs = {}, {}
    for name, overrides in ((n, o) for n, o in ARMS.items() if args.only in n):
        for seed in args.under_seeds if "under-trained" in name else args.seeds:
            out = args.out / name.split(" (")[0].replace(" ", "_").lower() / f"seed{seed}"
            results.setdefault(name, []).append(run_arm(overrides, seed, out))
            dirs.setdefault(name, []).append(out)
    (HERE / "results.json").write_text(json.dumps({"bases": bases, "runs": results}, indent=1))
    plot_curves(dirs, bases)
    text = table(results, bases)
    print(text)
    (HERE / "results.md").write_text(f"Seeds: {args.seeds}\n\n{text}\n")


if __name__ == "__main__":
    main()
