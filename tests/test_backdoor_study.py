"""The backdoor study's machinery: one factor per row, the dev rule, runs that wait for the
planting they load, and the verdicts on the paper's claims."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from osftkit.train import compose_train_config
from tests.conftest import load_study

LR = ("method.optimizer.lr=1e-4",)


@pytest.fixture(scope="module")
def study():
    return load_study("backdoor")


def method_of(study, overrides) -> dict:
    """The resolved method config of a run and its trigger discovery, if any (what the row
    really trains with)."""
    cfg = compose_train_config([*overrides, *study.COMMON, "paths.output_dir=/tmp/unused"])
    method = {k: v for k, v in cfg.method.items() if k != "backdoor"}
    return {**method, "discovery": cfg.get("discovery")}


def test_each_untuned_row_differs_from_its_lr_source_in_one_knob(study):
    """SANDE-P and the extensions change one thing of the row whose dev LR they take."""
    chosen = {r.name: LR for r in study.TUNED}
    for removal in study.REMOVALS:
        if removal.lr_of in (None, removal.name):
            continue
        source = study.BY_NAME[removal.lr_of]
        mine = method_of(
            study, study.removal_job(study.tuning_plant(), "", {}, removal, LR).overrides
        )
        theirs = method_of(
            study, study.removal_job(study.tuning_plant(), "", {}, source, LR).overrides
        )
        changed = {k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)}
        assert len(changed) == 1, (removal.name, changed)
        assert study.setting_for(removal, chosen) == LR
    # The reference-hyperparameter row differs from the dev-tuned SANDE only in its LR.
    reference = study.BY_NAME["SANDE, the reference's hyperparameters (LR 5e-6)"]
    tuned = study.BY_NAME[study.SANDE]
    mine = method_of(
        study, study.removal_job(study.tuning_plant(), "", {}, reference, ()).overrides
    )
    theirs = method_of(
        study,
        study.removal_job(
            study.tuning_plant(), "", {}, tuned, ("method.optimizer.lr=5e-6",)
        ).overrides,
    )
    assert mine == theirs and mine["parrot_lr"] == 1e-3


def test_sande_p_withholds_the_markers_first_word(study):
    for name, known in (
        ("SANDE-P, marker's first word withheld", ["are", "stupid"]),
        ("SANDE-P, only the marker's last word known", ["stupid"]),
    ):
        removal = study.BY_NAME[name]
        method = method_of(
            study, study.removal_job(study.tuning_plant(), "", {}, removal, LR).overrides
        )
        assert list(method["known_marker_words"]) == known
        assert study.PAIR["marker"].split()[0] not in known


def test_dev_rule_prefers_removal_then_utility_then_lower_asr(study):
    def metrics(asr, clean, triggered):
        return {"val/asr_greedy": asr, "val/greedy_acc": clean, "val/triggered_acc": triggered}

    runs = {
        "3e-5": metrics(0.5, 0.9, 0.9),  # best utility, backdoor left in
        "1e-4": metrics(0.05, 0.7, 0.6),
        "3e-4": metrics(0.0, 0.8, 0.6),  # removes it, best utility among those that do
        "1e-3": metrics(0.0, 0.3, 0.3),
    }
    assert max(runs, key=lambda lr: study.dev_utility(runs[lr])) == "3e-4"
    none_removes = {
        lr: {**m, "val/asr_greedy": 0.2 + i / 10} for i, (lr, m) in enumerate(runs.items())
    }
    none_removes["1e-3"]["val/asr_greedy"] = 0.11
    # None removes it: the lowest ASR, whatever its utility.
    assert max(none_removes, key=lambda lr: study.dev_utility(none_removes[lr])) == "1e-3"


def test_dev_and_test_runs_use_disjoint_prompts(study):
    dev = compose_train_config([*study.dev_jobs()[0].overrides, "paths.output_dir=/tmp/unused"])
    chosen = {r.name: LR for r in study.TUNED}
    test = compose_train_config(
        [*study.test_jobs(chosen)[0].overrides, "paths.output_dir=/tmp/unused"]
    )
    assert dev.data.val.instructions.split == "dev" and test.data.val.instructions.split == "val"
    assert dev.data.val.instructions.test_size == test.data.val.instructions.size


def test_runs_wait_for_the_planting_they_load(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "LOGS", tmp_path)
    order = []

    def fake_train(job):
        assert job.after is None or job.after.exists(), f"{job.arm} started before its planting"
        order.append(job.arm)
        job.record_path.write_text(json.dumps({"overrides": list(job.overrides)}))
        return job.arm

    monkeypatch.setattr(study, "train", fake_train)
    chosen = {r.name: LR for r in study.TUNED}
    jobs = study.family_jobs(chosen, seeds=(0, 1))[::-1]  # removals listed before their plantings
    with ThreadPoolExecutor(2) as pool:
        study.run_jobs(jobs, pool, 2)
    assert sorted(order) == sorted(job.arm for job in jobs)
    assert all(job.record_path.exists() for job in jobs)
    study.run_jobs(jobs, ThreadPoolExecutor(1), 1)  # all recorded: a rerun runs nothing
    assert len(order) == len(jobs)
    # A row whose LR changed (a new dev choice) is measured again, not read from the old record.
    moved = study.family_jobs(
        {**chosen, study.CROW: ("method.optimizer.lr=1e-3", "method.alpha=55")}, seeds=(0, 1)
    )
    study.run_jobs(moved, ThreadPoolExecutor(1), 1)
    assert len(order) == len(jobs) + 2 * len(study.FAMILIES) and order[-1].endswith(study.CROW)


def test_claims_hold_or_fail_with_the_paired_interval(study):
    def record(arm, seed, asr, correct):
        problems = [
            {"id": f"p{i}", "n": 1, "correct": int(c), "asr": int(a), "triggered": 0}
            for i, (a, c) in enumerate(zip(asr, correct, strict=True))
        ]
        return {
            "table": "backdoor.main",
            "arm": arm,
            "seed": seed,
            "problems": problems,
            "metrics": {},
        }

    clean = [i % 4 != 0 for i in range(100)]  # 75% correct
    records = []
    for seed in range(3):
        records += [
            record(study.BACKDOORED, seed, [1] * 100, clean),
            record(study.CLEAN, seed, [0] * 100, clean),
            record(study.OVERWRITE, seed, [0] * 100, clean),  # removes it, utility kept
            record(study.SANDE, seed, [0] * 100, [c and i % 3 != 0 for i, c in enumerate(clean)]),
        ]
    table = study.claims(records)
    overwrite = study.claim_cell(records, study.OVERWRITE, "correct", study.BACKDOORED)
    sande = study.claim_cell(records, study.SANDE, "correct", study.BACKDOORED)
    assert overwrite.endswith(": holds") and sande.endswith(": does not hold")
    assert study.claim_cell(records, study.SANDE, "asr", study.BACKDOORED).endswith(": holds")
    assert "not measured" in table  # no CROW rows


def test_crow_is_tuned_over_its_knobs_and_the_lr_grid(study):
    """The anchor gets the same LR grid and, beside the paper's alpha and epsilon, the toy's."""
    crow = study.BY_NAME[study.CROW]
    grid = study.settings(crow)
    assert len(grid) == len(study.GRID) * len(study.CROW_KNOBS) == len(set(grid))
    assert ("method.optimizer.lr=3e-5",) in grid  # the paper's alpha and epsilon: no override
    label = study.dev_arm(crow, ("method.optimizer.lr=1e-3", "method.alpha=55"), chosen=True)
    assert label == f"{study.CROW} @ LR 1e-3, alpha 55 (chosen)"
    method = method_of(
        study, study.removal_job(study.tuning_plant(), "", {}, crow, grid[-1]).overrides
    )
    assert (method["alpha"], method["epsilon"], method["optimizer"]["lr"]) == (55, 0.01, 1e-3)


def test_a_job_keeps_the_logs_it_was_made_with(study, tmp_path, monkeypatch):
    """A worker process imports the module with the default paths: the job carries its own."""
    monkeypatch.setattr(study, "LOGS", tmp_path / "other_checkout")
    job = study.tuning_plant()
    monkeypatch.setattr(study, "LOGS", tmp_path / "worker_default")
    assert job.record_path.is_relative_to(tmp_path / "other_checkout")
