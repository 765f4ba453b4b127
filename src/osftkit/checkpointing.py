"""Checkpoint I/O that never leaves a half-written file behind, and the RNG states a checkpoint
carries so that a resumed run draws the same samples as an uninterrupted one."""

import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.cloud_io import _atomic_save, get_filesystem
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
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


def run_seed() -> int:
    """The seed `L.seed_everything` set for this run (0 before it is called)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def local_rng_states() -> dict[str, Any]:
    """This process's torch, CUDA, Python and NumPy RNG states (Lightning's collector)."""
    return _collect_rng_states(include_cuda=True)


def set_local_rng_states(states: dict[str, Any]) -> None:
    """Put back what `local_rng_states` took."""
    _set_rng_states(states)


def rng_states() -> list[dict[str, Any]]:
    """Every rank's torch, CUDA, Python and NumPy RNG states (Lightning's collector), in types
    that torch.load(weights_only=True) accepts; a collective when several ranks run."""
    states = local_rng_states()
    name, keys, *rest = states["numpy"]
    states["numpy"] = [name, keys.tolist(), *rest]
    if not dist.is_initialized():
        return [states]
    gathered: list[dict[str, Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, states)
    return gathered


def restore_rng_states(states: list[dict[str, Any]] | dict[str, Any]) -> None:
    """This rank's states (a checkpoint from a single-rank run seeds every rank alike)."""
    if isinstance(states, dict):  # written before the states were kept per rank
        states = [states]
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = dict(states[rank] if rank < len(states) else states[0])
    name, keys, *rest = mine["numpy"]
    mine["numpy"] = (name, np.array(keys, dtype=np.uint32), *rest)
    if not torch.cuda.is_available():
        mine.pop("torch.cuda", None)
    set_local_rng_states(mine)
