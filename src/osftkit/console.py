"""What a run prints: one line per log event, no advertisements, progress bars only where a
person watches (a terminal), and a rich progress bar for the kit's own long steps."""

import logging
import sys
import warnings
from datetime import timedelta
from typing import Any

import datasets
import lightning as L
import transformers
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger(__name__)

# Lightning 2.6 logs this on every Trainer without a LitLogger; it has no switch of its own
# (logger_connector.configure_logger), so a filter on the logger that emits it drops it.
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
LIGHTNING_INFO_LOGGER = "lightning.pytorch.utilities.rank_zero"


def drop_litlogger_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(LITLOGGER_TIP)


def configure_console() -> None:
    """Set up the console for a run (idempotent; call after Hydra has configured logging)."""
    # `import lightning` gives the `lightning` logger its own console handler ("INFO: ...") AND
    # lets records propagate to the root, where Hydra's handler prints them a second time.
    if logging.getLogger().handlers:
        lightning = logging.getLogger("lightning")
        for handler in list(lightning.handlers):
            if type(handler) is logging.StreamHandler:
                lightning.removeHandler(handler)
    info = logging.getLogger(LIGHTNING_INFO_LOGGER)
    if drop_litlogger_tip not in info.filters:
        info.addFilter(drop_litlogger_tip)
    # tqdm bars in a file or a pipe are one line per refresh (100 per split); keep them for
    # terminals only.
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    # Lightning 2.6's own pytree helper (utilities/_pytree.py) still uses torch's deprecated
    # LeafSpec: nothing the user can change, printed on every fit. Only that message is muted.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module="lightning.pytorch.utilities._pytree",
    )
    # DDP on CPU (hardware.cpu_processes, ddp_sim): Lightning's notes on what the kit does on
    # purpose. The distributed sampler is the point; torchmetrics syncs the validation metrics
    # in compute(), so self.log's sync_dist would reduce them twice; the deprecated all_gather
    # is Lightning's own call.
    for message in (
        r"Using `DistributedSampler` with the dataloaders",
        r"It is recommended to use `self\.log\('val/",
        r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
    ):
        warnings.filterwarnings("ignore", message=message)


class StepProgressBar(ProgressBar):
    """One rich bar over a whole fit (optimiser steps of the fit: done, elapsed, time
    left), for the kit's long steps, such as building a base, where per-epoch bars mislead."""

    def __init__(self, description: str, log_every_fraction: float = 0.1) -> None:
        super().__init__()
        self.description, self.enabled = description, True
        self.log_every_fraction = log_every_fraction
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.next_logged = self.total = 0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
        )
        self.progress.start()
        # Lightning's own total: max_steps, or the steps of max_epochs when max_steps is -1.
        self.total = int(trainer.estimated_stepping_batches)
        self.task = self.progress.add_task(self.description, total=self.total)
        self.next_logged = self.log_step(self.total)

    def log_step(self, total: int) -> int:
        return max(1, round(total * self.log_every_fraction))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.progress is None:
            return
        self.progress.update(self.task, completed=trainer.global_step)
        # A file or a pipe gets no live bar (rich draws it once, at the end): a log line
        # every tenth of the run says how far it is and how long is left instead.
        if not self.progress.console.is_terminal and trainer.global_step >= self.next_logged:
            task = self.progress.tasks[0]
            left = task.time_remaining
            log.info(
                "%s: step %d/%d, %s elapsed, about %s left",
                self.description,
                trainer.global_step,
                self.total,
                timedelta(seconds=round(task.elapsed or 0)),
                timedelta(seconds=round(left)) if left is not None else "?",
            )
            self.next_logged += self.log_step(self.total)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def train_position(max_steps: int, max_epochs: int | None, step: int, epoch: int) -> str:
    """Where a fit is, in the unit that bounds it: `step 37/200` when max_steps does, else the
    epoch (`Epoch 2/9`, or `Epoch 2` for an unbounded one)."""
    if max_steps > 0:
        return f"step {step}/{max_steps}"
    if max_epochs is None or max_epochs < 0:
        return f"Epoch {epoch}"
    return f"Epoch {epoch}/{max_epochs - 1}"


class RunProgressBar(RichProgressBar):
    """Lightning's rich bar, saying how far the run is in the unit that bounds it (Lightning's
    own reads `Epoch 0/-2` for a run bounded by max_steps)."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        position = train_position(
            trainer.max_steps, trainer.max_epochs, trainer.global_step, current_epoch
        )
        # As Lightning's: as wide as "Validation", so the bars do not flicker.
        return f"{position:{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_batch_end(trainer, *args)
        if self.progress is not None and self.train_progress_bar_id is not None:
            description = self._get_train_description(trainer.current_epoch)
            self.progress.update(self.train_progress_bar_id, description=description)
