"""A callback that writes each optimiser step's training losses to a JSON file (golden runs)."""

import json
from pathlib import Path

import lightning as L


class LossRecorder(L.Callback):
    """After every training batch: the `train/*` values Lightning holds, appended to `path`."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *_: object) -> None:
        metrics = trainer.callback_metrics
        self.steps.append({k: float(v) for k, v in metrics.items() if k.startswith("train/")})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.steps))
