"""Helpers for the `hardware=` group: CPU threads and FSDP wrap classes named in YAML."""

import logging

import torch
from hydra.utils import get_class

log = logging.getLogger(__name__)


def configure_threads(num_threads: int | None) -> None:
    """Pin torch's intra-op threads. On small shared CPUs, oversubscription is far slower than 1."""
    if num_threads:
        torch.set_num_threads(num_threads)
        log.info("torch uses %d CPU thread(s) (hardware.num_threads)", num_threads)


def module_classes(names: list[str]) -> set[type]:
    """Resolve dotted class names (e.g. a model's decoder layer) for FSDP's auto-wrap policy."""
    if not names:
        raise ValueError("give at least one layer class name to wrap")
    return {get_class(name) for name in names}
