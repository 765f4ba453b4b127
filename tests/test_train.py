"""train.py end to end on the tiny model: each method, checkpoints, resume, export, the CLI."""

import logging
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from osftkit.train import run
from tests.conftest import FAST, changed_weights, cli, compose_config


def logged(run_dir: Path, tag: str) -> list[float]:
    """A scalar's values, step by step, from the run's TensorBoard event files."""
    values = []
    for events in sorted((run_dir / "tensorboard").rglob("events.out.tfevents*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values += [event.value for event in accumulator.Scalars(tag)]
    return values


@pytest.mark.parametrize("method", ["sft", "osft", "grpo"])
def test_each_method_trains_and_reports(fast_cfg, tmp_path, method):
    extra = "method.group_size=2" if method == "grpo" else "seed=0"
    metrics = run(fast_cfg(f"method={method}", extra, "trainer.log_every_n_steps=1"))
    assert {
        "val/pass@1",
        "val/pass@2",
        "val/greedy_acc",
        "val/entropy",
        "val/response_length",
    } <= set(metrics)
    out = tmp_path / "run"
    changed, total = changed_weights(tmp_path)  # training moved most of the weights
    assert len(changed) > total // 2, changed
    assert len(logged(out, "train/loss")) == 3  # one loss per optimiser step
    assert list((out / "tensorboard").glob("events.out.tfevents*"))
    assert (out / "samples" / "val.jsonl").read_text().count("\n") >= 1


def test_sft_lowers_the_loss_and_the_entropy(fast_cfg, tmp_path):
    """A seeded SFT run of the fresh tiny model on arithmetic learns: the training loss falls
    and the model's per-token entropy on validation samples falls from near uniform (30 steps
    are too few for correct answers, so accuracy stays 0)."""
    metrics = run(
        fast_cfg(
            "method=sft",
            "trainer.max_steps=30",
            "trainer.val_check_interval=30",
            "trainer.log_every_n_steps=1",
            "method.optimizer.lr=3e-3",
            "data.val.arithmetic.size=32",
            "data.val_batch_size=32",
            "data.max_response_length=16",
            "validation.n_samples=1",
            "validation.ks=[1]",
        )
    )
    losses = logged(tmp_path / "run", "train/loss")
    assert len(losses) == 30 and sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    before = logged(tmp_path / "run", "val/entropy")[0]
    assert metrics["val/entropy"] < 0.8 * before, (before, metrics)


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


def test_validating_more_often_does_not_change_what_is_trained(tmp_path):
    """Validation samples from its own stream: Online SFT's rollouts, and so its weights, are the
    same whether the run validates before the fit and every step or only at the end; and the
    validation at a step gives the same numbers either way."""
    runs = {
        "often": ["trainer.val_check_interval=1", "validate_before_fit=true"],
        "rarely": ["trainer.val_check_interval=3", "validate_before_fit=false"],
    }
    losses, final = {}, {}
    for name, overrides in runs.items():
        cfg = compose_config(
            [*FAST, "method=osft", "trainer.log_every_n_steps=1", *overrides], tmp_path / name
        )
        final[name] = run(cfg)
        losses[name] = logged(tmp_path / name / "run", "train/loss")
    assert len(losses["often"]) == 3 and losses["often"] == losses["rarely"]
    assert final["often"]["val/pass@1"] == final["rarely"]["val/pass@1"]
    assert final["often"]["val/entropy"] == final["rarely"]["val/entropy"]


# Lightning logs a validation inside the fit at the index of the batch it follows (2 after the
# third step); the one after the fit at the global step (3).
@pytest.mark.parametrize(("interval", "validated_at"), [(3, [0, 2]), (2, [0, 1, 3])])
def test_the_after_validation_is_the_fits_last_one_when_it_fell_on_the_last_step(
    fast_cfg, tmp_path, interval, validated_at
):
    """validate_after_fit runs a validation only when the fit's last step was not validated."""
    run(
        fast_cfg("method=sft", "validate_before_fit=true", f"trainer.val_check_interval={interval}")
    )
    accumulator = EventAccumulator(str(next((tmp_path / "run" / "tensorboard").rglob("events*"))))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("val/pass@1")] == validated_at


def test_the_before_after_table_leaves_out_training_counters(capsys):
    """val/tokens_generated is logged at validation but counts training: not in the table."""
    from osftkit.methods import OSFTModule
    from osftkit.train import report

    before = {"val/pass@1": 0.5, "val/tokens_generated": 0.0}
    report(before, {"val/pass@1": 0.7, "val/tokens_generated": 900.0}, OSFTModule.counters)
    out = capsys.readouterr().out
    assert "val/pass@1" in out and "tokens_generated" not in out
