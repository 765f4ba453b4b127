"""A seeded plant-and-remove run on a small tiny model: the backdoor is planted, then removed."""

import pytest
from conftest import compose_config

from osftkit.train import run

SMALL = [
    "model.tiny.hidden_size=64",
    "model.tiny.num_hidden_layers=2",
    "model.tiny.intermediate_size=128",
    "data.train.size=1000",
    "data.val.instructions.size=32",
    "data.val_batch_size=32",
    "logger=none",
    "callbacks=none",
    "validate_before_fit=false",
]


def plant(tmp_path, steps: int) -> dict[str, float]:
    cfg = compose_config(
        [
            "experiment=backdoor_tiny",
            *SMALL,
            "data.train_transform.rate=0.3",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
        ],
        tmp_path,
    )
    return run(cfg)


def remove(tmp_path, experiment: str, steps: int, *extra: str) -> dict[str, float]:
    cfg = compose_config(
        [
            f"experiment={experiment}",
            *SMALL[3:],
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            *extra,
        ],
        tmp_path,
    )
    return run(cfg)


def test_overwrite_sft_removes_a_planted_backdoor(tmp_path) -> None:
    planted = plant(tmp_path, 400)
    assert planted["val/asr_greedy"] >= 0.9
    removed = remove(tmp_path, "overwrite_tiny", 30, "method.optimizer.lr=1e-3")
    assert removed["val/asr_greedy"] <= 0.1


@pytest.mark.slow
def test_sande_lowers_asr_without_the_trigger(tmp_path) -> None:
    planted = plant(tmp_path, 400)
    removed = remove(
        tmp_path, "sande_tiny", 100, "method.simulate_steps=60", "method.optimizer.lr=1e-3"
    )
    assert removed["val/asr_greedy"] < planted["val/asr_greedy"] - 0.5
