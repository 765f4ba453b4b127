"""Shared fixtures: compose the real `train` config with small, fast overrides in tmp_path."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import osftkit.recipes  # noqa: F401  (the methods' typed schemas, before any compose)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
os.environ.setdefault("OSFTKIT_ROOT", str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach a hub
os.environ["HF_DATASETS_OFFLINE"] = "1"
torch.set_num_threads(1)

# A run small enough for a unit test: tiny model, a few steps, few validation prompts.
FAST = [
    "model=tiny",
    "data.train.size=256",
    "data.val.arithmetic.size=8",
    "data.batch_size=8",
    "data.val_batch_size=8",
    "data.max_response_length=32",
    "validation.n_samples=2",
    "validation.ks=[1,2]",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "callbacks.progress_bar=null",
]


def load_study(name: str):
    """experiments/<name>/run.py as a module (its functions under test, nothing run)."""
    path = Path(__file__).resolve().parents[1] / "experiments" / name / "run.py"
    spec = importlib.util.spec_from_file_location(f"{name}_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_config(overrides: list[str], tmp_path: Path | None = None) -> DictConfig:
    """The train config as `python train.py <overrides>` would see it, with paths in tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    if tmp_path is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.log_dir = str(tmp_path / "logs")
            cfg.paths.model_dir = str(tmp_path / "models")
    return cfg


@pytest.fixture
def fast_cfg(tmp_path):
    """Factory: a fast config on the tiny model with extra overrides."""
    return lambda *extra: compose_config([*FAST, *extra], tmp_path)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """The tiny model and tokenizer, built once per session (read-only use)."""
    from osftkit.models import load_causal_lm

    cfg = compose_config(["model=tiny"])
    cache_dir = str(tmp_path_factory.mktemp("models"))
    return load_causal_lm(cache_dir=cache_dir, tiny=dict(cfg.model.tiny))


def cli_command(*args: str, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """`python train.py <args>` with logs and built models in tmp_path, and its environment."""
    env = {**os.environ, "OSFTKIT_ROOT": str(ROOT)}
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *args,
        f"paths.log_dir={tmp_path}",
        f"paths.model_dir={tmp_path / 'models'}",
    ]
    return command, env


def cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    command, env = cli_command(*args, tmp_path=tmp_path)
    return subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )


def changed_weights(tmp_path: Path) -> tuple[list[str], int]:
    """(names of the tensors the run in tmp_path changed, tensors in all): its last.ckpt
    against the tiny model it started from (fast_cfg's model dir holds just that one)."""
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    (start_dir,) = (p.parent for p in (tmp_path / "models").glob("*/config.json"))
    start = AutoModelForCausalLM.from_pretrained(start_dir).state_dict()
    return [k for k, v in start.items() if not torch.equal(trained[f"model.{k}"], v)], len(start)
