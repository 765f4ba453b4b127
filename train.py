"""Entry point: `python train.py method=osft model=tiny ...` (see README for the cookbook)."""

import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import osftkit.recipes  # noqa: F401  (registers the methods' typed schemas before Hydra composes)

os.environ.setdefault("OSFTKIT_ROOT", str(Path(__file__).resolve().parent))
log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from osftkit.train import one_line_errors, run  # here, so `--help` and config errors stay fast

    if HydraConfig.get().mode != RunMode.MULTIRUN:
        with one_line_errors():
            return run(cfg).get(cfg.get("optimized_metric"))
    # In a sweep a failed trial (NaN loss, bad hyperparameters) is logged and returns None: the
    # Optuna sweeper records a failed trial (NaN would crash its `tell`), and the sweep goes on.
    try:
        return run(cfg).get(cfg.get("optimized_metric"))
    except Exception:
        log.exception("Trial %s failed; the sweep continues", HydraConfig.get().job.num)
        return None


if __name__ == "__main__":
    main()
