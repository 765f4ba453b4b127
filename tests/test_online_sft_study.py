"""The Online SFT study's machinery: held-out training prompts, per-problem outcomes of every
validation, and the choices and verdicts it makes from them."""

import json
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from osftkit.results.outcomes import read_validation_outcomes
from osftkit.train import run
from tests.conftest import compose_config, load_study


@pytest.fixture(scope="module")
def study():
    return load_study("online_sft")


def test_the_study_trains_on_no_dev_or_test_problem(tmp_path):
    cfg = compose_config(["experiment=osft_arith"], tmp_path)
    source = instantiate(cfg.data.train)()
    kept = instantiate(cfg.data.train_transform)(source)
    test_rows, dev_rows = instantiate(cfg.data.val.arithmetic)(), instantiate(cfg.data.val.dev)()
    test, dev = set(test_rows["problem"]), set(dev_rows["problem"])
    assert len(test_rows) == len(dev_rows) == 256 and not test & dev
    assert not set(kept["problem"]) & (test | dev)
    assert 0.8 * len(source) < len(kept) < len(source)  # about 13% of the rows dropped
    assert cfg.optimized_metric == "val/dev/pass@1"  # the best checkpoint is chosen on dev


def test_every_validation_writes_its_problems_outcomes(fast_cfg, tmp_path):
    outcomes = tmp_path / "outcomes"
    cfg = fast_cfg(
        "data=arithmetic_heldout",
        "data.val.dev.size=8",
        "logger=none",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "validate_before_fit=false",
        "validate_after_fit=false",
        "+callbacks.validation_outcomes._target_=osftkit.results.outcomes.ValidationOutcomes",
        f"+callbacks.validation_outcomes.dirpath={outcomes}",
    )
    metrics = run(cfg)
    saved = read_validation_outcomes(outcomes)
    assert sorted(saved) == [2, 4] and not list(outcomes.glob("*.part"))
    last = saved[4]
    assert sorted(last) == ["arithmetic", "dev"]
    assert [p["id"] for p in last["dev"]] == [f"dev/{i}" for i in range(8)]
    for name, rows in last.items():
        assert all(p["n"] == 2 and 0 <= p["correct"] <= 2 and len(p["lengths"]) == 2 for p in rows)
        pass1 = np.mean([p["correct"] / p["n"] for p in rows])
        assert pass1 == pytest.approx(metrics[f"val/{name}/pass@1"])


def points(*dev: float) -> list[dict[str, float]]:
    return [{"step": 10 * (i + 1), "dev/pass@1": v} for i, v in enumerate(dev)]


def test_the_stopping_step_is_the_dev_peak_earliest_among_ties(study):
    assert study.best_on_dev(points(0.5, 0.7, 0.7, 0.6))["step"] == 20


def test_a_winning_edge_of_the_grid_is_extended(study):
    inside = {3e-5: points(0.5), 1e-4: points(0.8), 3e-4: points(0.6)}
    upper = {3e-5: points(0.5), 1e-4: points(0.6), 3e-4: points(0.7)}
    lower = {3e-5: points(0.9), 1e-4: points(0.6), 3e-4: points(0.7)}
    assert study.choose_lr(inside) == 1e-4 and study.next_lr(inside) is None
    assert study.next_lr(upper) == 9e-4
    assert study.next_lr(lower) == 9e-6
    assert study.run_dir(Path("o"), "G = 8", 9e-4, 1) == Path("o/g_8/lr9e-4/seed1")
    assert study.tuned(inside) and not study.tuned(upper)
    twice = {**upper, 9e-4: points(0.8), 3e-3: points(0.9)}  # still winning at the edge
    assert study.tuned(twice) and not study.tuned({1e-4: points(0.8)})


def test_the_equal_token_view_reads_an_arm_that_stops_generating_at_its_end(study):
    growing = [{"step": s, "tokens": 1000.0 * s} for s in (50, 100, 150)]
    frozen = [{"step": s, "tokens": 300.0} for s in (50, 100, 150)]
    assert study.closest_to(growing, 90_000)["step"] == 100
    assert study.closest_to(frozen, 90_000)["step"] == 150


def records(first: list[list[int]], second: list[list[int]]) -> list[dict]:
    """Two rows of the plateau table: (seeds, problems) correct counts out of n = 8."""
    return [
        {
            "table": "online_sft.plateau",
            "arm": arm,
            "seed": seed,
            "problems": [{"id": f"p{i}", "n": 8, "correct": c} for i, c in enumerate(row)],
        }
        for arm, grid in (("a", first), ("b", second))
        for seed, row in enumerate(grid)
    ]


@pytest.mark.parametrize(
    ("shift", "relation", "verdict"),
    [
        (2, "above", "held"),
        (0, "above", "FAILED"),
        (0, "level", "held"),
        (2, "level", "FAILED"),
        (0, "not above", "held"),
        (2, "not above", "FAILED"),
    ],
)
def test_a_verdict_follows_the_paired_interval(study, shift, relation, verdict):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 7, size=(3, 200))
    noise = rng.integers(-1, 2, size=(3, 200))
    rows = records((np.clip(base + noise + shift, 0, 8)).tolist(), base.tolist())
    prediction = study.Prediction("p", "online_sft.plateau", "a", "b", relation)
    assert study.verdict(prediction, rows).endswith(f"| {verdict} |")


def test_a_row_without_records_is_not_measured(study):
    prediction = study.Prediction("p", "online_sft.plateau", "a", "missing", "above")
    assert "not measured" in study.verdict(prediction, records([[1]], [[1]]))


def test_the_arms_share_one_generation_budget(study):
    budgets = {name: arm.steps * arm.responses_per_step for name, arm in study.ARMS.items()}
    assert all(12_288 <= b <= 12_800 for b in budgets.values()), budgets
    assert all(arm.steps % study.VALIDATIONS == 0 for arm in study.ARMS.values())
    assert json.dumps(study.GRID) == "[3e-05, 0.0001, 0.0003]"


def test_busy_time_leaves_out_the_pauses_between_sittings(study):
    # Two overlapping runs, a pause, then one more run: 0-15 and 100-110 were busy.
    assert study.busy_time([(0, 10), (5, 15), (100, 110)]) == 25
    assert study.busy_time([(0, 10), (2, 3)]) == 10 and study.busy_time([]) == 0
