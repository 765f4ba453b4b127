"""Checkpoint I/O that never leaves a half-written file behind."""

import os
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.cloud_io import _atomic_save, get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `<path>.tmp`, fsyncs, then renames over `<path>`: a kill mid-save keeps the old file."""

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
