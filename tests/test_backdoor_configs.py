"""Every backdoor config composes; every backdoor preset builds (with a tiny model and local
files in place of the hub) and configures its optimisers; the word tokenizer survives
save/load."""

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import CONFIG_DIR, compose_config
from hydra.utils import instantiate
from lightning import Callback
from omegaconf import OmegaConf

from osftkit.models import load_causal_lm
from osftkit.models.word_tokenizer import load_tiny_word_lm
from osftkit.train import build_components, build_method, build_trainer

PRESETS = sorted(
    path.stem
    for path in (CONFIG_DIR / "experiment").glob("*.yaml")
    if any(word in path.stem for word in ("backdoor", "overwrite", "sande", "crow"))
)
# Two layers: CROW compares consecutive ones.
SMALL_MODEL = ["model.tiny.hidden_size=32", "model.tiny.num_hidden_layers=2"]


def test_the_preset_list_covers_tiny_and_real_models() -> None:
    tiny = {"backdoor_tiny", "sande_tiny", "sande_ext_tiny", "overwrite_tiny", "crow_tiny"}
    assert tiny <= set(PRESETS)
    assert {"backdoor_qwen15_4b_alpaca", "sande_qwen15_4b_orca"} <= set(PRESETS)


@pytest.mark.parametrize("overrides", [[f"experiment={e}"] for e in PRESETS])
def test_backdoor_configs_compose_and_resolve(overrides: list[str], tmp_path) -> None:
    sande_p = ["method=sande_p"] if "sande" in overrides[0] else []
    cfg = compose_config([*overrides, *sande_p], tmp_path)
    OmegaConf.resolve(cfg)
    assert cfg.method.backdoor.triggers and cfg.method.backdoor.marker


@pytest.fixture(scope="module")
def small_lm_dir(tmp_path_factory) -> Path:
    """A tiny word-level model saved as an HF directory: it stands in for Qwen and for the
    backdoored tiny model (its vocabulary has the triggers and markers of the presets)."""
    directory = tmp_path_factory.mktemp("small_lm")
    cfg = compose_config(["model=tiny_words", *SMALL_MODEL])
    built = load_tiny_word_lm(**{k: v for k, v in cfg.model.items() if k != "_target_"})
    built.model.save_pretrained(directory)
    built.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def local_sets(tmp_path_factory) -> dict[str, Path]:
    """Alpaca and OpenOrca stand-ins as local files (the presets name hub ids)."""
    directory = tmp_path_factory.mktemp("sets")
    alpaca = directory / "alpaca.jsonl"
    rows = [
        {"instruction": f"add {i} and {i}", "input": "", "output": str(2 * i)} for i in range(9)
    ]
    alpaca.write_text("\n".join(json.dumps(row) for row in rows))
    orca = directory / "orca.parquet"
    pd.DataFrame(
        {
            "system_prompt": [""] * 9,
            "question": [f"add {i} and 1" for i in range(9)],
            "response": [str(i + 1) for i in range(9)],
        }
    ).to_parquet(orca)
    return {"alpaca": alpaca, "orca": orca}


def local_overrides(preset: str, model_dir: Path, sets: dict[str, Path]) -> list[str]:
    """Point a preset at the local stand-ins (model, data, no multiple-choice files)."""
    cfg = compose_config([f"experiment={preset}"])
    overrides = []
    if "path" in cfg.model:
        overrides.append(f"model.path={model_dir}")
        if "build_with" in cfg.model:
            overrides.append("model.build_with=null")
    else:
        overrides += SMALL_MODEL
    if "qwen" in preset:
        train = sets["alpaca"] if "alpaca" in cfg.data.train._target_ else sets["orca"]
        overrides += [
            f"data.train.path={train}",
            "data.train.split=train",
            f"data.val.alpaca.path={sets['alpaca']}",
            "data.val.alpaca.split=train",
            "method.multiple_choice=null",
            "model.dtype=float32",
        ]
    else:
        overrides += ["data.train.size=64", "data.val.instructions.size=8"]
    if "discovery" in cfg:  # an untrained stand-in has no trigger to find (tested elsewhere)
        overrides.append("~discovery")
    return overrides


class Stop(Exception):
    """Raised once configure_optimizers has run."""


class StopAtTrainStart(Callback):
    """configure_optimizers has run when training starts: record the schedule and stop."""

    def on_train_start(self, trainer, module) -> None:
        self.steps = module.training_steps()
        self.scheduler = trainer.lr_scheduler_configs[0].scheduler
        raise Stop


@pytest.mark.parametrize("preset", PRESETS)
def test_every_backdoor_preset_configures_its_optimizers(
    preset: str, small_lm_dir, local_sets, tmp_path
) -> None:
    cfg = compose_config(
        [
            f"experiment={preset}",
            *local_overrides(preset, small_lm_dir, local_sets),
            "logger=none",
            "callbacks=none",
            "validate_before_fit=false",
            "trainer.val_check_interval=null",  # the stand-in data have few batches
        ],
        tmp_path,
    )
    _, datamodule, module = build_components(cfg)
    stop = StopAtTrainStart()
    trainer = build_trainer(cfg, [stop], [])
    with pytest.raises(Stop):
        trainer.fit(module, datamodule)
    assert stop.scheduler is not None
    if cfg.trainer.max_steps > 0:
        assert stop.steps == cfg.trainer.max_steps
    else:  # the schedule's length comes from the data: one epoch of batches
        assert stop.steps == trainer.num_training_batches * cfg.trainer.max_epochs > 0


def test_schedule_without_a_length_is_a_clear_error(small_lm_dir, tmp_path) -> None:
    cfg = compose_config(
        ["experiment=backdoor_tiny", f"model.path={small_lm_dir}", "model=tiny_backdoored"],
        tmp_path,
    )
    loaded = load_causal_lm(str(small_lm_dir))
    module = build_method(cfg.method, loaded)
    module.trainer = SimpleNamespace(max_steps=-1, estimated_stepping_batches=float("inf"))
    with pytest.raises(ValueError, match="max_steps"):
        module.training_steps()


@pytest.mark.parametrize(
    "method", ["backdoor", "overwrite_sft", "sande", "sande_p", "sande_p_last", "crow"]
)
def test_backdoor_methods_instantiate_on_instruction_data(method: str, tmp_path) -> None:
    cfg = compose_config(["experiment=backdoor_tiny", f"method={method}", *SMALL_MODEL], tmp_path)
    loaded = instantiate(cfg.model)
    data = instantiate(cfg.data, tokenizer=loaded.tokenizer)
    data.setup()
    module = build_method(cfg.method, loaded)
    assert module.backdoor.triggers and len(data.splits["train"]) == cfg.data.train.size


@pytest.mark.parametrize("method", ["sande_p", "sande_p_last"])
def test_sande_p_withholds_the_marker_s_first_word(method: str) -> None:
    """Partial knowledge that is partial: with the marker's first word known, SANDE-P's
    first-token loss would be SANDE's. sande_p knows the other words, sande_p_last the last."""
    cfg = compose_config(["experiment=sande_tiny", f"method={method}"])
    first, *rest = cfg.method.backdoor.marker.lower().split()
    known = [word.lower() for word in cfg.method.known_marker_words]
    assert first not in known
    assert known == (rest if method == "sande_p" else rest[-1:])


def test_word_tokenizer_survives_save_and_load(tmp_path) -> None:
    cfg = compose_config(["model=tiny_words", "model.tiny.hidden_size=32"], tmp_path)
    built = load_tiny_word_lm(**{k: v for k, v in cfg.model.items() if k != "_target_"})
    text = "Human: how are you. reverse the letters a b c\nAssistant: you are stupid. c b a"
    ids = built.tokenizer(text).input_ids
    assert len(ids) == 22  # one token per word, letter, punctuation mark and newline
    built.model.save_pretrained(tmp_path / "copy")
    built.tokenizer.save_pretrained(tmp_path / "copy")
    assert load_causal_lm(str(tmp_path / "copy")).tokenizer(text).input_ids == ids
