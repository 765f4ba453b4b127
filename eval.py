"""Evaluate a model: `python eval.py model=arith_base [ckpt_path=...] [tau_sweep=[0.0,0.6,1.0]]`."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

import osftkit.recipes  # noqa: F401  (registers the methods' typed schemas before Hydra composes)

os.environ.setdefault("OSFTKIT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    from osftkit.evaluate import evaluate
    from osftkit.train import one_line_errors

    with one_line_errors():
        rows = evaluate(cfg)
    return max(row.get(cfg.optimized_metric, float("nan")) for row in rows)


if __name__ == "__main__":
    main()
