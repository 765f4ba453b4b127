"""Every option of every config group composes, resolves and instantiates."""

import importlib.util
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import OmegaConf

from osftkit.data import PromptDataModule
from osftkit.data.datamodule import pad_left
from osftkit.hardware import configure_threads
from osftkit.methods import CausalLMModule
from osftkit.models import LoadedModel
from osftkit.models.loading import HUB_ID, ModelNotFoundError
from osftkit.train import (
    build_method,
    build_trainer,
    clear_errors,
    compose_train_config,
    instantiate_group,
    resolve_hardware,
    trainer_precision,
)
from tests.conftest import CONFIG_DIR, compose_config

# protocol: eval.py's presets (tests/test_eval_protocol.py composes them with eval.yaml)
GROUPS = sorted(
    p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "protocol")
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


ALL = [(group, option) for group in GROUPS for option in options(group)]


def experiment_defaults(experiment: str) -> dict[str, str]:
    """The groups an experiment overrides, e.g. {"model": "mlp", "method": "regression"}."""
    text = yaml.safe_load((CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text())
    pairs = {}
    for entry in text.get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                pairs[key.replace("override /", "")] = value
    return pairs


def partner(group: str, option: str, wanted: str) -> str | None:
    """The option of group `wanted` that an experiment pairs with `group=option`."""
    for experiment in options("experiment"):
        pairs = experiment_defaults(experiment)
        if pairs.get(group) == option and wanted in pairs:
            return pairs[wanted]
    return None


def context(group: str, option: str) -> list[str]:
    """Non-LM options (digits, mlp, ...) only make sense inside the experiment that uses them."""
    for experiment in options("experiment"):
        if experiment_defaults(experiment).get(group) == option:
            return [f"experiment={experiment}"]
    return []


@pytest.mark.parametrize(("group", "option"), ALL)
def test_every_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose_config([*context(group, option), f"{group}={option}"], tmp_path)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group not in ("experiment", "hparams_search", "debug"):  # those are global deltas
        assert cfg[group] is not None


@pytest.mark.parametrize("option", options("hardware"))
def test_hardware(option, tmp_path):
    cfg = compose_config([f"hardware={option}"], tmp_path)
    assert cfg.hardware.num_threads >= 1
    if cfg.hardware.accelerator in ("cpu", "auto"):  # auto: the CPU here (or one GPU)
        trainer = build_trainer(cfg, [], [])
        assert trainer.world_size == cfg.hardware.devices
        assert trainer.precision == "32-true"  # the default model computes in fp32
    elif "_target_" in (cfg.hardware.get("strategy") or {}):
        instantiate(cfg.hardware.strategy)  # GPU strategies build without a GPU
    if option.startswith("fsdp"):
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

        strategy = instantiate(cfg.hardware.strategy)
        assert strategy.layer_classes == (Qwen2DecoderLayer,)
        assert strategy.mp_policy.reduce_dtype == torch.float32


@pytest.mark.parametrize("gpu", [True, False])
def test_auto_hardware_takes_the_gpu_when_there_is_one(gpu, tmp_path, monkeypatch, caplog):
    """The default hardware=auto: a GPU with the model's compute dtype over fp32 weights (as
    hardware=gpu), else the CPU with its one thread; the choice is logged."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    cfg = compose_config(["model=qwen"], tmp_path)
    assert cfg.hardware.accelerator == "auto"
    with caplog.at_level(logging.INFO, logger="osftkit"):
        resolve_hardware(cfg)
    assert cfg.hardware.accelerator == ("gpu" if gpu else "cpu")
    assert f"hardware=auto chose the {'GPU' if gpu else 'CPU'}" in caplog.text
    assert trainer_precision(cfg, None) == "bf16-mixed"  # model=qwen computes in bf16
    assert cfg.hardware.num_threads == 1


def test_model_dtype_is_the_compute_dtype_over_fp32_weights(tmp_path):
    """bf16 compute: autocast on gpu, FSDP2's parameter cast on fsdp; the Trainer's precision."""
    gpu = compose_config(["model=qwen", "hardware=gpu"], tmp_path)
    assert trainer_precision(gpu, None) == "bf16-mixed"
    fsdp = compose_config(["model=qwen", "hardware=fsdp"], tmp_path)
    strategy = instantiate(fsdp.hardware.strategy)
    assert strategy.mp_policy.param_dtype == torch.bfloat16
    assert trainer_precision(fsdp, strategy) == "32-true"


@pytest.mark.parametrize("group", ["logger", "callbacks"])
def test_logger_and_callback_options_instantiate(group, tmp_path):
    for option in options(group):
        cfg = compose_config([f"{group}={option}"], tmp_path)
        for item in instantiate_group(cfg[group]):
            assert isinstance(item, Logger if group == "logger" else Callback), (option, item)


@pytest.mark.parametrize("option", options("model"))
def test_model_options(option, tmp_path):
    cfg = compose_config([*context("model", option), f"model={option}"], tmp_path)
    if cfg.model.get("build_with"):
        compose_train_config(list(cfg.model.build_with))  # the build recipe is a valid run
    elif HUB_ID.match(str(cfg.model.get("path") or "")) and cfg.model.get("tiny") is None:
        with pytest.raises(ModelNotFoundError, match="pre-download"), clear_errors():
            instantiate(cfg.model)  # offline: one clear error saying what to do
    else:
        assert isinstance(instantiate(cfg.model), LoadedModel)


@pytest.mark.parametrize("option", options("data"))
def test_data_options(option, tmp_path, tiny_lm):
    cfg = compose_config([*context("data", option), f"data={option}"], tmp_path)
    target = get_class(cfg.data._target_)
    lm = issubclass(target, PromptDataModule)
    datamodule = instantiate(cfg.data, **({"tokenizer": tiny_lm.tokenizer} if lm else {}))
    assert isinstance(datamodule, target)


@pytest.mark.parametrize("option", options("method"))
def test_method_options(option, tmp_path, tiny_lm):
    cfg = compose_config([f"method={option}"], tmp_path)
    target = get_class(cfg.method._target_)
    if issubclass(target, CausalLMModule):
        module = build_method(cfg.method, tiny_lm, validation=dict(cfg.validation))
    else:
        model_option = partner("method", option, "model")
        assert model_option, f"no experiment shows which model method={option} trains"
        model_cfg = compose_config([*context("model", model_option), f"model={model_option}"]).model
        module = instantiate(cfg.method, _convert_="all", model=instantiate(model_cfg).model)
    assert isinstance(module, target)
    assert any(p.requires_grad for p in module.parameters())  # something to train


def test_experiment_configs_open_with_their_command():
    for path in sorted(Path(CONFIG_DIR / "experiment").glob("*.yaml")):
        first, second = path.read_text().splitlines()[:2]
        assert first == "# @package _global_", path
        assert second.startswith("# python train.py") and f"experiment={path.stem}" in second, path


@pytest.mark.parametrize("option", options("engine"))
def test_engine_options_instantiate(option, tmp_path, tiny_lm):
    config = compose_config([f"engine={option}"], tmp_path).engine
    if option == "vllm" and importlib.util.find_spec("vllm") is None:
        with pytest.raises(InstantiationException, match=r"\.\[gpu\]"):  # at construction
            instantiate(config)
        return
    engine = instantiate(config)
    assert type(engine).__name__ == config._target_.rsplit(".", 1)[1]
    # The keys the configs hold reach the engine (engine=vllm's: tests/test_vllm_engine.py).
    read = {"hf": lambda: engine.max_batch_tokens, "paged": lambda: engine.settings}[option]
    assert (
        read()
        == {"hf": config.get("max_batch_tokens"), "paged": config.get("continuous_batching")}[
            option
        ]
    )
    # ... and the engine generates what it is asked for: G rows per prompt, at most
    # max_new_tokens each, the response mask a prefix ending at the first EOS or the limit.
    prompts = [tiny_lm.tokenizer(t, add_special_tokens=False).input_ids for t in ("1+2=", "33*4=")]
    ids, mask = pad_left(prompts, tiny_lm.tokenizer.pad_token_id)
    eos, pad = tiny_lm.tokenizer.eos_token_id, tiny_lm.tokenizer.pad_token_id
    for temperature in (0.0, 1.0):
        rollouts = engine.generate(
            tiny_lm.model, ids, mask, num_samples=3, temperature=temperature, top_p=1.0,
            max_new_tokens=5, eos_token_id=eos, pad_token_id=pad,
        )  # fmt: skip
        assert rollouts.response_ids.shape[0] == 6 and rollouts.group_size == 3
        assert rollouts.response_ids.shape[1] <= 5 and (rollouts.lengths >= 1).all()
        ended = (rollouts.response_ids == eos) & rollouts.response_mask.bool()
        assert (ended.any(dim=1) | rollouts.truncated).all()
        assert (rollouts.truncated == (rollouts.lengths == 5) & ~ended.any(dim=1)).all()
        assert torch.equal(rollouts.prompt_ids, ids.repeat_interleave(3, dim=0))


@pytest.mark.parametrize(
    ("experiment", "size"),
    [("feature_simulation", "data.num_features=7"), ("feature_sentences", None)],
)
def test_small_nets_take_their_input_size_from_the_data(experiment, size, tmp_path):
    """model=mlp reads data.num_features; model=text_classifier the sentences' vocabulary."""
    from osftkit.data.sentences import VOCAB

    cfg = compose_config([f"experiment={experiment}", *([size] if size else [])], tmp_path)
    model = instantiate(cfg.model).model
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding))
    expected = 7 if size else len(VOCAB)
    assert (
        first.in_features if isinstance(first, torch.nn.Linear) else first.num_embeddings
    ) == expected


@pytest.mark.parametrize("gpu", [True, False])
def test_auto_hardware_runs_cpu_processes_only_without_a_gpu(gpu, tmp_path, monkeypatch):
    """hardware.cpu_processes=2 (scripts/main.sh): DDP over gloo on 2 CPU processes of one
    thread each when no GPU is visible; one GPU otherwise."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    cfg = compose_config(["hardware.cpu_processes=2"], tmp_path)
    resolve_hardware(cfg)
    assert "cpu_processes" not in cfg.hardware and cfg.hardware.num_threads == 1
    if gpu:
        assert cfg.hardware.devices == 1 and "strategy" not in cfg.hardware
        return
    trainer = build_trainer(cfg, [], [])
    assert trainer.world_size == 2 and trainer.strategy.process_group_backend == "gloo"


def test_num_threads_null_gives_one_thread_per_core_this_process_may_use():
    configure_threads(1)  # what conftest pins, so the check below sees null act
    configure_threads(None)
    assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    configure_threads(1)
    assert torch.get_num_threads() == 1


def test_the_base_recipe_sees_each_training_solution_once(tmp_path):
    cfg = compose_config(["experiment=arith_base"], tmp_path)
    assert cfg.data.train.size == cfg.trainer.max_steps * cfg.data.batch_size
    assert cfg.hardware.num_threads is None  # the build has the machine to itself
