"""train.py end to end on the tiny model: each method, checkpoints, resume, export, the CLI."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from osftkit.train import run
from tests.conftest import FAST, cli


@pytest.mark.parametrize("method", ["sft", "osft", "grpo"])
def test_each_method_trains_and_reports(fast_cfg, tmp_path, method):
    metrics = run(
        fast_cfg(f"method={method}", "method.group_size=2" if method == "grpo" else "seed=0")
    )
    assert 0.0 <= metrics["val/pass@1"] <= 1.0
    assert {"val/pass@2", "val/greedy_acc", "val/entropy", "val/response_length"} <= set(metrics)
    out = tmp_path / "run"
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert list((out / "tensorboard").glob("events.out.tfevents*"))
    assert (out / "samples" / "val.jsonl").read_text().count("\n") >= 1


def test_fast_dev_run(fast_cfg):
    assert "val/pass@1" in run(fast_cfg("method=sft", "+trainer.fast_dev_run=true"))


def test_resume_continues_from_last_checkpoint(fast_cfg, tmp_path):
    run(fast_cfg("method=sft"))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    run(fast_cfg("method=sft", f"ckpt_path={last}", "trainer.max_steps=5"))
    assert torch.load(last, weights_only=True)["global_step"] == 5


def test_export_writes_a_loadable_hf_directory(fast_cfg, tmp_path):
    run(fast_cfg("method=sft", f"export_dir={tmp_path / 'export'}"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert model.config.model_type == "qwen2"


def test_missing_base_is_built_with_the_kit_on_first_use(fast_cfg, tmp_path, caplog):
    build = [o for o in FAST if not o.startswith("model=")] + [
        "experiment=arith_base",
        "logger=none",
    ]
    quoted = ",".join(f"'{override}'" for override in build)
    overrides = ["model=arith_base", f"model.build_with=[{quoted}]"]
    with caplog.at_level(logging.INFO, logger="osftkit"):
        run(fast_cfg("method=sft", "trainer.max_steps=1", *overrides))
    assert (tmp_path / "models" / "arith_base" / "config.json").exists()
    assert "Building model 'arith_base'" in caplog.text


def test_cli_writes_only_under_the_run_directory(tmp_path):
    result = cli(*FAST, "method=sft", "task_name=smoke", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "smoke" / "runs").iterdir()
    assert {".hydra", "checkpoints", "tensorboard", "samples"} <= {
        p.name for p in run_dir.iterdir()
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "smoke"]


def test_unknown_option_lists_the_choices(tmp_path):
    result = cli("method=nope", tmp_path=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'method/nope'" in result.stderr
    assert "Available options" in result.stderr and "osft" in result.stderr


def test_ddp_sim_runs_two_cpu_processes(tmp_path):
    result = cli(*FAST, "method=osft", "hardware=ddp_sim", "task_name=ddp", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "distributed_backend=gloo" in output and "All distributed processes registered" in output
