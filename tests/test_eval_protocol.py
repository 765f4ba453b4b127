"""SePT's base-tau protocol: a dev split disjoint from the test split chooses tau_eval by AVG."""

import json
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import open_dict

from osftkit.data import build_arithmetic, disjoint_rows
from osftkit.eval_protocol import best_tau, check_after_eval
from osftkit.evaluate import evaluate
from osftkit.results.rescore import read_samples, rescore
from osftkit.results.store import ResultStore
from osftkit.rewards import AnswerChecker
from osftkit.train import compose_train_config
from tests.conftest import FAST, compose_config


def eval_cfg(tmp_path, *overrides: str):
    """eval.py's config on the fast tiny setup, writing under tmp_path."""
    cfg = compose_train_config([*FAST, *overrides], config_name="eval")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.model_dir = str(tmp_path / "models")
    return cfg


def sweep_cfg(tmp_path, *extra: str):
    return eval_cfg(tmp_path, "protocol=base_tau_sweep_arith", *extra)


def test_the_arithmetic_dev_split_is_disjoint_from_the_test_split(tmp_path):
    cfg = sweep_cfg(tmp_path)
    dev = instantiate(cfg.dev.arithmetic)()
    test = instantiate(cfg.data.val.arithmetic)()
    assert len(dev) == cfg.dev.arithmetic.size
    assert not set(dev["problem"]) & set(test["problem"])
    assert dev["problem"] != instantiate(cfg.dev.arithmetic)()["problem"][::-1]  # not reordered
    assert dev["problem"] == instantiate(cfg.dev.arithmetic)()["problem"]  # seeded


def test_a_dev_split_can_avoid_the_training_set_too():
    def make(split, size):
        return lambda: build_arithmetic(split, size, num_ops=3, operand_max=20)

    dev = disjoint_rows(make("dev", 200), [make("train", 500), make("val", 100)], size=150)
    others = set(make("train", 500)()["problem"]) | set(make("val", 100)()["problem"])
    assert len(dev) == 150 and not set(dev["problem"]) & others


def test_too_small_a_source_is_one_clear_error():
    def make(split, size):
        return lambda: build_arithmetic(split, size)

    with pytest.raises(ValueError, match=r"rows are outside the excluded sets, 100 asked"):
        disjoint_rows(make("dev", 100), [make("train", 20000)], size=100)


def test_best_tau_maximises_avg_and_breaks_ties_low():
    rows = [{"tau_eval": t, "val/avg": a} for t, a in [(1.0, 0.5), (0.2, 0.7), (0.6, 0.7)]]
    assert best_tau(rows) == 0.2


def test_a_dev_sweep_chooses_tau_then_scores_the_test_split(tmp_path):
    cfg = sweep_cfg(tmp_path, "tau_sweep=[0.0,1.0]", "dev.arithmetic.size=8")
    rows = evaluate(cfg)
    run = tmp_path / "run"
    chosen = json.loads((run / "base_tau.json").read_text())
    sweep = (run / "dev_sweep" / "eval.csv").read_text().splitlines()
    assert len(sweep) == 3 and (run / "dev_sweep" / "tau_sweep.png").exists()
    assert chosen["tau_eval"] in (0.0, 1.0) and chosen["criterion"] == "val/avg"
    assert rows == [chosen["test"]] and rows[0]["tau_eval"] == chosen["tau_eval"]
    dev_avg = {float(line.split(",")[0]): line for line in sweep[1:]}
    assert chosen["dev"]["val/avg"] == max(
        float(line.split(",")[sweep[0].split(",").index("val/avg")]) for line in dev_avg.values()
    )


def test_a_dev_split_without_a_sweep_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs tau_sweep"):
        evaluate(sweep_cfg(tmp_path, "tau_sweep=null", "dev.arithmetic.size=8"))


@pytest.mark.parametrize(
    "experiment",
    [
        "osft_qwen_math_7b_dsr",
        "osft_qwen_math_1p5b_dsr",
        "grpo_qwen_math_7b_dsr",
        "sept_qwen_math_7b_dsr",
    ],
)
def test_the_qwen_presets_validate_with_septs_protocol(experiment, tmp_path):
    """n = 32 at tau_eval 1 with pass@1, 8, 32 (and val/avg, their mean); the offline presets
    keep train.yaml's n = 8."""
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert (cfg.validation.n_samples, list(cfg.validation.ks)) == (32, [1, 8, 32])
    assert cfg.validation.tau_eval == 1.0
    assert compose_config(["experiment=osft_arith"], tmp_path).validation.n_samples == 8


def test_eval_writes_per_problem_records_that_another_grader_can_rescore(tmp_path):
    """store=<dir>: one stamped record per tau with per-problem outcomes; store_samples adds
    every sample, and re-scoring them with the same grader agrees on all of them."""
    store = tmp_path / "store"
    cfg = eval_cfg(tmp_path, "tau_sweep=[0.0,1.0]", f"store={store}", "store_samples=true")
    rows = evaluate(cfg)
    records = ResultStore(store).records()
    assert [r["arm"] for r in records] == ["test tau_eval=0", "test tau_eval=1"]
    for record, row in zip(records, rows, strict=True):
        problems = record["problems"]
        assert len(problems) == 8 and {p["n"] for p in problems} == {2}
        assert [p["id"] for p in problems] == [f"arithmetic/{i}" for i in range(8)]
        assert all(len(p["lengths"]) == 2 for p in problems)
        pass1 = sum(p["correct"] / p["n"] for p in problems) / len(problems)
        assert pass1 == pytest.approx(row["val/pass@1"])
        assert record["seed"] == 0 and record["table"] == "eval" and record["commit"]
        samples = read_samples(store / record["samples"])
        assert len(samples) == 16 and sum(s["correct"] for s in samples) == sum(
            p["correct"] for p in problems
        )
        assert rescore(samples, AnswerChecker(extract="boxed", compare="exact")).rate == 1.0


def test_without_store_samples_a_record_has_outcomes_only(tmp_path):
    store = tmp_path / "store"
    evaluate(eval_cfg(tmp_path, f"store={store}"))
    (record,) = ResultStore(store).records()
    assert record["samples"] is None and len(record["problems"]) == 8


def test_rescore_with_a_second_grader_reports_agreement(tmp_path):
    store = tmp_path / "store"
    cfg = eval_cfg(tmp_path, f"store={store}", "store_samples=true", "rescore_with=sept")
    evaluate(cfg)
    report = json.loads((tmp_path / "run" / "rescore.json").read_text())
    (arm,) = report.values()
    assert (arm["first"], arm["second"], arm["samples"]) == ("exact", "sept", 16)
    assert arm["agree"] + arm["only_first"] + arm["only_second"] == 16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rescore_with=sept"], "set store=<dir> store_samples=true"),
        (["store=x", "store_samples=true", "rescore_with=nope"], "rescore_with must be one of"),
        (["general_domain={limit: 2}"], "hands lm-eval a model directory"),
    ],
)
def test_after_eval_options_fail_with_one_clear_message(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        evaluate(eval_cfg(tmp_path, *overrides))


def test_general_domain_without_lm_eval_is_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    cfg = eval_cfg(tmp_path, "general_domain={limit: 2}")
    with open_dict(cfg):
        cfg.model.path = str(tmp_path / "model")
    with pytest.raises(ValueError, match="needs lm-evaluation-harness, which is not installed"):
        check_after_eval(cfg)


def test_the_deepscaler_dev_split_avoids_the_benchmarks(tmp_path):
    """protocol=base_tau_sweep_dsr, read from local files: the dev rows are training problems
    that none of the test sets holds."""
    rows = [{"problem": f"p{i}", "answer": str(i)} for i in range(12)]
    tables = {"train": rows, "math500": rows[:3], "aime24": rows[5:6], "amc23": rows[11:]}
    overrides = [
        "experiment=osft_qwen_math_7b_dsr",
        "protocol=base_tau_sweep_dsr",
        f"data.train.path={tmp_path / 'train.jsonl'}",
        *(
            f"data.val.{name}.path={tmp_path / name}.jsonl"
            for name in ("math500", "aime24", "amc23")
        ),
        "dev.dsr_dev.size=7",
    ]
    cfg = compose_train_config(overrides, config_name="eval")
    for name, table in tables.items():
        columns = (cfg.data.train if name == "train" else cfg.data.val[name]).columns
        source = [{columns[key]: row[key] for key in ("problem", "answer")} for row in table]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in source))
    dev = instantiate(cfg.dev.dsr_dev)()
    assert dev["problem"] == ["p3", "p4", "p6", "p7", "p8", "p9", "p10"]
    assert cfg.tau_sweep[-1] == 1.6 and len(cfg.tau_sweep) == 17


def test_general_domain_runs_lm_eval_on_the_model_directory(tmp_path):
    pytest.importorskip("lm_eval")
    from osftkit.models.tiny import TinyQwen2Spec, save_tiny

    model_dir = tmp_path / "model"
    save_tiny(TinyQwen2Spec(hidden_size=32, num_hidden_layers=1, intermediate_size=64), model_dir)
    tasks = Path(__file__).parent / "data" / "lm_eval"
    cfg = eval_cfg(
        tmp_path,
        "model=arith_base",
        f"model.path={model_dir}",
        f"general_domain={{tasks: [osftkit_arith_choice], include_path: {tasks}, limit: 4}}",
    )
    evaluate(cfg)
    results = json.loads((tmp_path / "run" / "general_domain.json").read_text())
    assert results["osftkit_arith_choice"]["sample_len"] == 4  # limit reached lm-eval
    assert 0.0 <= results["osftkit_arith_choice"]["acc,none"] <= 1.0
