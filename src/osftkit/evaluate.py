"""evaluate(cfg): validation metrics of a model or checkpoint, optionally over a tau_eval sweep
(on the test sets, or with `dev`, SePT's choice of the base's tau on a dev split)."""

import csv
import logging
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from osftkit.eval_protocol import (  # noqa: E402
    after_eval,
    attach_recorder,
    base_tau_on_dev,
    check_after_eval,
    validate_at,
)
from osftkit.run_logger import close_run_loggers, tensorboard_writers  # noqa: E402
from osftkit.train import (  # noqa: E402
    build_components,
    build_trainer,
    instantiate_group,
    start_run,
)

log = logging.getLogger(__name__)


def load_weights(module: L.LightningModule, ckpt_path: str) -> None:
    """Load a Lightning checkpoint's weights (weights only: no code runs while loading)."""
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint '{ckpt_path}' does not exist.")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state, strict=False)


def evaluate(cfg: DictConfig) -> list[dict[str, float]]:
    """One row of validation metrics per tau_eval; also written as CSV, Markdown and a plot
    (tau_sweep.png, and in TensorBoard's IMAGES tab as `eval/tau_sweep`)."""
    start_run(cfg)
    _, datamodule, module = build_components(cfg)
    if cfg.get("ckpt_path"):
        load_weights(module, cfg.ckpt_path)
    check_after_eval(cfg)  # before the validations: a missing lm-eval stops here
    recorder = attach_recorder(cfg, module, datamodule)  # store=<dir>: records of each tau
    loggers = instantiate_group(cfg.get("logger"))
    trainer = build_trainer(cfg, instantiate_group(cfg.get("callbacks"), data=datamodule), loggers)
    if cfg.get("dev"):  # the base's tau chosen on a dev split, then scored on the test split
        rows = base_tau_on_dev(cfg, trainer, module, datamodule, write_results)
    else:
        taus = cfg.tau_sweep or [cfg.validation.tau_eval]
        rows = [validate_at(trainer, module, datamodule, tau) for tau in taus]
        figure = write_results(rows, Path(cfg.paths.output_dir))
        if figure is not None and trainer.is_global_zero:
            for writer in tensorboard_writers(loggers):
                writer.add_figure("eval/tau_sweep", figure, global_step=0)
    close_run_loggers(loggers)
    after_eval(cfg, recorder, datamodule.checker)  # rescore_with, general_domain
    return rows


def write_results(rows: list[dict[str, float]], directory: Path) -> plt.Figure | None:
    """eval.csv and eval.md; for a sweep also tau_sweep.png, whose figure is returned."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with (directory / "eval.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |" for row in rows]
    (directory / "eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure = None
    if len(rows) > 1:
        figure, axis = plt.subplots(figsize=(5, 3.5))
        plotted = ("val/avg", "val/greedy_acc")
        for key in (k for k in keys if k.startswith("val/pass@") or k in plotted):
            axis.plot([r["tau_eval"] for r in rows], [r[key] for r in rows], marker="o", label=key)
        axis.set_xlabel("tau_eval")
        axis.set_ylabel("score")
        axis.legend()
        figure.tight_layout()
        figure.savefig(directory / "tau_sweep.png", dpi=120)
    log.info(
        "Wrote eval.csv, eval.md%s to %s", " and tau_sweep.png" if len(rows) > 1 else "", directory
    )
    return figure
