"""Checkpoint I/O that never leaves a half-written file behind, and the RNG states a checkpoint
carries so that a resumed run draws the same samples as an uninterrupted one."""

import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _atomic_save, get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `<path>.tmp`, fsyncs, then renames it over `<path>`: a kill mid-save keeps the
    previous file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        if not isinstance(get_filesystem(path), type(get_filesystem("."))):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(path.name + ".tmp")
        _atomic_save(checkpoint, scratch)
        with open(scratch, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(scratch, path)


class StepCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` steps, except on a step that validates next: the
    validation-end checkpoint follows, and a run resumed from a checkpoint taken before that
    validation would skip it (Lightning does not re-run it), drawing different samples after."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        loop = trainer.fit_loop
        if loop.epoch_loop._should_check_val_fx(loop._data_fetcher):
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def rng_states() -> dict[str, Any]:
    """torch, Python and NumPy RNG states in types that torch.load(weights_only=True) accepts."""
    name, keys, *rest = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), *rest],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
