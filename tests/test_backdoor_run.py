"""A seeded plant-and-remove run on a small tiny model: the backdoor is planted, then removed;
the removal run also scores zero-shot multiple choice and writes per-prompt outcomes."""

import json

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
    arc = tmp_path / "arc.jsonl"
    row = {"question": "add 1 and 1", "choices": {"text": ["2", "3"], "label": ["A", "B"]}}
    arc.write_text(json.dumps({**row, "answerKey": "A"}) + "\n")
    removed = remove(
        tmp_path,
        "overwrite_tiny",
        30,
        "method.optimizer.lr=1e-3",
        f"method.multiple_choice={{arc: {{path: '{arc}', format: arc}}}}",
    )
    assert removed["val/asr_greedy"] <= 0.1
    assert removed["val/mc_arc"] in (0.0, 1.0)  # one question: right or wrong
    outcomes = json.loads((tmp_path / "run" / "backdoor_outcomes.json").read_text())
    scored = outcomes["instructions"]
    assert len(scored["problem"]) == len(scored["asr"]) == len(scored["clean"]) == 32
    assert sum(scored["asr"]) / 32 == pytest.approx(removed["val/asr_greedy"])


@pytest.mark.slow
def test_sande_lowers_asr_without_the_trigger(tmp_path) -> None:
    planted = plant(tmp_path, 400)
    removed = remove(
        tmp_path, "sande_tiny", 100, "method.simulate_steps=60", "method.optimizer.lr=1e-3"
    )
    assert removed["val/asr_greedy"] < planted["val/asr_greedy"] - 0.5


@pytest.mark.slow
def test_discover_then_overwrite_removes_the_backdoor(tmp_path) -> None:
    """Trigger unknown to the removal: discovery (calibrated, two-stage) proposes and confirms
    phrases, Overwrite SFT trains on them, and ASR with the PLANTED trigger falls."""
    planted = plant(tmp_path, 400)
    assert planted["val/asr_greedy"] >= 0.9
    removed = remove(
        tmp_path,
        "discover_overwrite_tiny",
        30,
        "method.optimizer.lr=1e-3",
        "discovery.num_prompts=20",
        "discovery.confirm_prompts=20",
        "discovery.calibration_prompts=20",
        "discovery.max_span=2",
    )
    record = json.loads((tmp_path / "run" / "discovery.json").read_text())
    assert record["confirmed"] and all(
        set(p.split()) <= {"how", "are", "you"} for p in record["confirmed"]
    )
    assert removed["val/asr_greedy"] <= 0.1
