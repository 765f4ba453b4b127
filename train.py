"""Entry point: `python train.py method=osft model=tiny ...` (see README for the cookbook)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("OSFTKIT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from osftkit.train import run  # imported here so `--help` and config errors stay fast

    metrics = run(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
