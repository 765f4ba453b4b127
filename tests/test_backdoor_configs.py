"""Every backdoor config composes; the tiny ones instantiate offline; the word tokenizer survives
save/load."""

import pytest
from conftest import compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from osftkit.models import load_causal_lm
from osftkit.models.word_tokenizer import load_tiny_word_lm

TINY = ["experiment=backdoor_tiny", "experiment=overwrite_tiny", "experiment=sande_tiny"]
REAL = [
    "experiment=backdoor_qwen15_4b_alpaca",
    "experiment=sande_qwen15_4b_orca",
    "experiment=overwrite_qwen15_4b_orca",
]


@pytest.mark.parametrize("overrides", [[e] for e in REAL + TINY] + [[TINY[2], "method=sande_p"]])
def test_backdoor_configs_compose_and_resolve(overrides: list[str], tmp_path) -> None:
    cfg = compose_config(overrides, tmp_path)
    OmegaConf.resolve(cfg)
    assert cfg.method.backdoor.triggers and cfg.method.backdoor.marker


@pytest.mark.parametrize("method", ["backdoor", "overwrite_sft", "sande", "sande_p"])
def test_backdoor_methods_instantiate_on_instruction_data(method: str, tmp_path) -> None:
    cfg = compose_config(
        ["experiment=backdoor_tiny", f"method={method}", "model.tiny.hidden_size=32"], tmp_path
    )
    loaded = instantiate(cfg.model)
    data = instantiate(cfg.data, tokenizer=loaded.tokenizer)
    data.setup()
    module = instantiate(cfg.method, model=loaded.model, tokenizer=loaded.tokenizer)
    assert module.trigger_ids and len(data.splits["train"]) > cfg.data.train.size


def test_word_tokenizer_survives_save_and_load(tmp_path) -> None:
    cfg = compose_config(["model=tiny_words", "model.tiny.hidden_size=32"], tmp_path)
    built = load_tiny_word_lm(**{k: v for k, v in cfg.model.items() if k != "_target_"})
    text = "Human: how are you. reverse the letters a b c\nAssistant: you are stupid. c b a"
    ids = built.tokenizer(text).input_ids
    assert len(ids) == 22  # one token per word, letter, punctuation mark and newline
    built.model.save_pretrained(tmp_path / "copy")
    built.tokenizer.save_pretrained(tmp_path / "copy")
    assert load_causal_lm(str(tmp_path / "copy")).tokenizer(text).input_ids == ids
