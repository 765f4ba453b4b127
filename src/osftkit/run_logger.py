"""TensorBoard for a run: one event file for all its phases, the HPARAMS tab with the final
metrics, and model text shown verbatim."""

import re
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

FINAL = "final/"  # tag prefix of the metrics the HPARAMS tab shows beside each run's config


class RunTensorBoardLogger(TensorBoardLogger):
    """A TensorBoardLogger that keeps one writer (one event file) for the whole run.

    Lightning finalises every logger at the end of each `validate` / `fit` call, and a closed
    SummaryWriter opens a new event file when it is written to again: a run that validates,
    fits and validates wrote three. Here finalising only flushes; `close()` ends the run.
    """

    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self.experiment.flush()
        if status == "success":
            self.save()  # hparams.yaml, as the parent does

    def close(self) -> None:
        super().finalize("success")


def logger_step(trainer: Any) -> int:
    """The step Lightning's loggers give what is logged now: inside a fit's validation, the index
    of the batch it follows (one below `global_step`). A tag written at a larger step before one
    at a smaller step makes TensorBoard purge the later points as if the run had restarted."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def log_final_hparams(loggers: list[Logger], cfg: DictConfig, metrics: dict, step: int) -> None:
    """The run's config with its final metrics (as `final/<name>` scalars at `step`), so the
    runs of a sweep compare in TensorBoard's HPARAMS tab."""
    final = {FINAL + name: value for name, value in metrics.items()}
    if not final:
        return
    params = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics=final, step=step)


def close_run_loggers(loggers: list[Logger]) -> None:
    """End the run's event files (the writers Lightning's phases kept open)."""
    for logger in loggers:
        if isinstance(logger, RunTensorBoardLogger):
            logger.close()


def verbatim_markdown(text: str) -> str:
    """`text` as a Markdown code block, so TensorBoard's TEXT tab shows it as written (`4*0*7`
    would otherwise lose its `*` to emphasis); the fence is longer than any backtick run in it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def tensorboard_writers(loggers: list[Logger]) -> list[Any]:
    """The SummaryWriters of the TensorBoard loggers among `loggers`."""
    return [logger.experiment for logger in loggers if isinstance(logger, TensorBoardLogger)]
