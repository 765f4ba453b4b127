"""Golden runs: a short seeded run of every method gives the numbers stored in
tests/golden/methods.json (recorded on the code before the recipes refactor). A change that
alters what a method computes fails here; `OSFTKIT_RECORD_GOLDEN=1` rewrites the file."""

import json
import math
import os
from pathlib import Path

import pytest
from omegaconf import open_dict

from osftkit.train import run
from tests.conftest import FAST, compose_config

GOLDEN = Path(__file__).parent / "golden" / "methods.json"
# Metrics the kit logs now that it did not when the numbers were recorded (SePT's AVG); every
# recorded metric must still be equal.
METRICS_ADDED_SINCE_RECORDING = ("val/avg",)
LOSS_TOLERANCE = 1e-6
QUIET = ["logger=none", "validate_before_fit=false", "data.val.arithmetic.size=4"]
# The backdoor rooms on the fresh word-level tiny model (no planted base to build).
WORDS = [
    "model=tiny_words",
    "model.tiny.hidden_size=32",
    "model.tiny.num_hidden_layers=1",
    "model.tiny.intermediate_size=64",
    "data.train.size=64",
    "data.batch_size=8",
    "data.val.instructions.size=4",
    "data.val_batch_size=4",
    "logger=none",
    "callbacks=none",
    "validate_before_fit=false",
    "method.backdoor.asr_samples=2",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
]
SHAPED = ["method.group_size=2", "method.overlong_buffer={length: 32, penalty_factor: 1.0}"]
CASES = {
    "osft": [*FAST, *QUIET, "method=osft"],
    "osft_offline": [*FAST, *QUIET, "method=osft_offline"],
    "em_ft": [*FAST, *QUIET, "method=em_ft"],
    # The untrained model earns no reward: the length penalty gives the groups advantages.
    "grpo": [*FAST, *QUIET, "method=grpo", *SHAPED, "method.num_minibatches=2"],
    "dr_grpo": [*FAST, *QUIET, "method=dr_grpo", *SHAPED, "method.kl_coef=0.05"],
    "dapo": [*FAST, *QUIET, "method=dapo", "method.group_size=2", "method.kl_coef=0.1"],
    "sft": [*FAST, *QUIET, "method=sft"],
    "backdoor": ["experiment=backdoor_tiny", *WORDS, "data.train_transform.rate=0.3"],
    "overwrite_sft": ["experiment=overwrite_tiny", *WORDS],
    "sande": ["experiment=sande_tiny", *WORDS, "method.simulate_steps=2", "trainer.max_steps=4"],
    "sande_p": [
        "experiment=sande_tiny",
        "method=sande_p",
        *WORDS,
        "method.simulate_steps=2",
        "trainer.max_steps=4",
    ],
}


def golden_run(overrides: list[str], tmp_path: Path) -> dict:
    """The run's per-step training losses and its final metrics."""
    cfg = compose_config(overrides, tmp_path)
    losses = tmp_path / "losses.json"
    with open_dict(cfg):
        cfg.callbacks = cfg.get("callbacks") or {}
        cfg.callbacks.golden = {
            "_target_": "tests.golden.recorder.LossRecorder",
            "path": str(losses),
        }
    final = run(cfg)
    return {"losses": json.loads(losses.read_text()), "final": final}


@pytest.mark.parametrize("case", list(CASES))
def test_golden_run(case: str, tmp_path: Path) -> None:
    got = golden_run(CASES[case], tmp_path)
    stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("OSFTKIT_RECORD_GOLDEN") == "1":
        # The file keeps the metrics of the original recording; added ones are checked below.
        for key in METRICS_ADDED_SINCE_RECORDING:
            got["final"].pop(key, None)
        stored[case] = got
        GOLDEN.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        return
    want = stored[case]
    assert len(got["losses"]) == len(want["losses"])
    for step, (a, b) in enumerate(zip(got["losses"], want["losses"], strict=True)):
        assert a.keys() == b.keys(), step
        for key in a:  # every logged train/ value, the losses among them
            assert math.isclose(a[key], b[key], rel_tol=0, abs_tol=LOSS_TOLERANCE), (step, key)
    added = {key: got["final"].pop(key, None) for key in METRICS_ADDED_SINCE_RECORDING}
    assert got["final"] == want["final"]
    if "val/pass@1" in want["final"] and "val/pass@2" in want["final"]:
        mean = (want["final"]["val/pass@1"] + want["final"]["val/pass@2"]) / 2
        assert math.isclose(added["val/avg"], mean, abs_tol=LOSS_TOLERANCE)
