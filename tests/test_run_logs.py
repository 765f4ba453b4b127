"""What a run leaves for a person: a readable console log, and one TensorBoard event file per
run with the HPARAMS tab, the tau-sweep figure and sample generations shown verbatim."""

import logging
from pathlib import Path

import pytest
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugin_util import markdown_to_safe_html
from tensorboard.plugins.hparams import plugin_data_pb2

from osftkit.console import LITLOGGER_TIP, configure_console
from osftkit.evaluate import evaluate
from osftkit.models import load_causal_lm
from osftkit.models.loading import ModelNotFoundError
from osftkit.run_logger import verbatim_markdown
from osftkit.train import compose_train_config, run
from tests.conftest import FAST, cli


def event_file(run_dir: Path) -> EventAccumulator:
    """The run's only event file, loaded with every tensor and image kept."""
    (path,) = (run_dir / "tensorboard").glob("events.out.tfevents*")
    events = EventAccumulator(str(path), size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    events.Reload()
    return events


def test_a_run_writes_one_event_file_with_hparams_and_final_metrics(fast_cfg, tmp_path):
    metrics = run(fast_cfg("method=sft", "validate_before_fit=true", "validate_after_fit=true"))
    events = event_file(tmp_path / "run")  # validate before, fit (whose last step was
    steps = [event.step for event in events.Scalars("val/pass@1")]  # validated: the "after")
    assert steps == [0, 2]  # Lightning logs the fit's validation at its last batch's index
    # The samples go with their validation: a larger step before a smaller one would make
    # TensorBoard purge the later points as if the run had restarted.
    assert [event.step for event in events.Tensors("val/samples/text_summary")] == steps
    final = events.Scalars("final/val/pass@1")
    assert [(e.step, e.value) for e in final] == [(3, pytest.approx(metrics["val/pass@1"]))]
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["method/optimizer/lr"].number_value == 1e-3
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    shown = {info.name.tag for info in experiment.experiment.metric_infos}
    assert "final/val/pass@1" in shown and "final/val/greedy_acc" in shown


def test_sample_generations_are_shown_verbatim(fast_cfg, tmp_path):
    run(fast_cfg("method=sft", "data.train.ops='*'"))  # a*b*c: 4 samples (the default)
    events = event_file(tmp_path / "run")
    (sample,) = events.Tensors("val/samples/text_summary")[-1:]
    html = markdown_to_safe_html(sample.tensor_proto.string_val[0].decode())
    problems = [line.split("  (gold")[0] for line in html.splitlines() if "(gold" in line]
    assert len(problems) == 4
    for problem in problems:  # `a*b*c` keeps its `*`: no Markdown emphasis ate it
        assert problem.split(">")[-1].count("*") == 2, html
    assert "<em>" not in html and "<strong>" not in html


def test_verbatim_markdown_fences_past_backticks():
    assert markdown_to_safe_html(verbatim_markdown("a ``` b *c*")).count("*c*") == 1


def test_a_tau_sweep_is_a_figure_in_tensorboard(tmp_path):
    cfg = compose_train_config([*FAST, "tau_sweep=[0.0,1.0]"], config_name="eval")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.model_dir = str(tmp_path / "models")
    rows = evaluate(cfg)
    assert [row["tau_eval"] for row in rows] == [0.0, 1.0]
    events = event_file(tmp_path / "run")
    assert events.Tags()["images"] == ["eval/tau_sweep"]
    assert (tmp_path / "run" / "tau_sweep.png").exists()


def test_the_loader_only_loads_a_model_built_by_training(tmp_path):
    missing = tmp_path / "models" / "arith_base"
    with pytest.raises(ModelNotFoundError, match=r"python train.py experiment=arith_base"):
        load_causal_lm(path=str(missing), build_with=["experiment=arith_base"])
    assert not missing.exists()  # nothing was trained or written


def test_the_console_log_has_one_line_per_event_and_no_noise(tmp_path):
    result = cli(*FAST, "method=sft", "task_name=readable", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Seed set to 0" in output
    assert output.count("Seed set to 0") == 1  # not once per handler
    assert "\nINFO: " not in output and not output.startswith("INFO: ")
    assert "litlogger" not in output and "LeafSpec" not in output
    assert "tokenising" not in output and "Loading weights" not in output  # no tqdm in a pipe


def test_the_litlogger_tip_is_dropped_and_other_lightning_lines_kept(caplog):
    configure_console()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        logger.info(LITLOGGER_TIP + " try installing litlogger")
        logger.info("GPU available: False, used: False")
    assert [record.getMessage() for record in caplog.records] == [
        "GPU available: False, used: False"
    ]


def test_a_missing_base_is_built_by_the_entry_point_with_a_progress_bar(
    fast_cfg, tmp_path, capsys, caplog
):
    caplog.set_level(logging.INFO, logger="osftkit.console")
    build = [o for o in FAST if not o.startswith("model=")]
    build += ["experiment=arith_base", "logger=none", "trainer.max_steps=2"]
    quoted = ",".join(f"'{override}'" for override in build)
    run(fast_cfg("model=arith_base", f"model.build_with=[{quoted}]", "method=sft"))
    assert (tmp_path / "models" / "arith_base" / "config.json").exists()
    bar = [line for line in capsys.readouterr().out.splitlines() if "Building arith_base" in line]
    assert bar and "2/2" in bar[-1] and "left" in bar[-1]  # done / total, then the time left
    # Output that is not a terminal also gets a log line per tenth of the build.
    steps = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("Building arith_base")
    ]
    assert [m.split(",")[0] for m in steps] == [
        "Building arith_base: step 1/2",
        "Building arith_base: step 2/2",
    ]
    assert all("left" in message for message in steps)
