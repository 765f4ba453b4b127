"""evaluate(cfg): validation metrics of a model or checkpoint, optionally over a tau_eval sweep."""

import csv
import logging
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

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
    loggers = instantiate_group(cfg.get("logger"))
    trainer = build_trainer(cfg, instantiate_group(cfg.get("callbacks"), data=datamodule), loggers)
    rows = []
    for tau in cfg.tau_sweep or [cfg.validation.tau_eval]:
        module.validation_settings.tau_eval = float(tau)
        metrics = trainer.validate(module, datamodule, verbose=False)[0]
        rows.append({"tau_eval": float(tau), **{k: float(v) for k, v in metrics.items()}})
    figure = write_results(rows, Path(cfg.paths.output_dir))
    if figure is not None and trainer.is_global_zero:
        for writer in tensorboard_writers(loggers):
            writer.add_figure("eval/tau_sweep", figure, global_step=0)
    close_run_loggers(loggers)
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
        for key in (k for k in keys if k.startswith("val/pass@") or k == "val/greedy_acc"):
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
