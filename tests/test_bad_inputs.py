"""The bad-input catalogue: one test per case, each asserting the message the user sees.
README's "Bad input" table lists the same cases."""

import copy
import logging
import subprocess

import pytest
import torch
from datasets import Dataset
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from safetensors.torch import save_file

from osftkit.backdoor.sande import load_parrot
from osftkit.data import DataLoadError, load_prompt_table
from osftkit.methods import SFTModule
from osftkit.models import load_causal_lm
from osftkit.models.loading import ModelNotFoundError, _ensure_pad_token
from osftkit.train import build_components, clear_errors, instantiate_group, run
from tests.conftest import FAST, cli_command, compose_config

COLUMNS = {"problem": "problem", "answer": "answer"}


def test_unknown_option_lists_the_choices():
    with pytest.raises(MissingConfigException, match=r"Could not find 'method/nope'") as error:
        compose_config(["method=nope"])
    assert "Available options" in str(error.value) and "osft" in str(error.value)


def test_unknown_model_id_offline_says_how_to_get_it():
    with pytest.raises(ModelNotFoundError, match=r"pre-download.*model\.path=/some/dir"):
        load_causal_lm(path="no-such-org/no-such-model")


def test_missing_local_path_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nowhere.*does not exist"):
        load_causal_lm(path=str(tmp_path / "nowhere"))
    with pytest.raises(DataLoadError, match="nope.parquet.*does not exist"):
        load_prompt_table(str(tmp_path / "nope.parquet"), COLUMNS)


def test_malformed_row_is_named(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": null}\n')
    with pytest.raises(DataLoadError, match="Row 1: required column 'answer' is empty"):
        load_prompt_table(str(path), COLUMNS)


def test_empty_split_is_named(tmp_path, fast_cfg, tiny_lm):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataLoadError, match="empty.jsonl' is empty"):
        load_prompt_table(str(path), COLUMNS)
    datamodule = instantiate(fast_cfg().data, tokenizer=tiny_lm.tokenizer)
    datamodule.factories["val/arithmetic"] = lambda: Dataset.from_dict(
        {"problem": [], "answer": []}
    )
    with pytest.raises(ValueError, match="data split 'val/arithmetic' is empty"):
        datamodule.setup("fit")


def test_over_long_prompts_are_skipped_and_counted(fast_cfg, tiny_lm, caplog):
    cfg = fast_cfg("data.max_prompt_length=8", "data.train.operand_max=99")
    with caplog.at_level(logging.WARNING):
        instantiate(cfg.data, tokenizer=tiny_lm.tokenizer).setup("fit")
    assert "train: skipped" in caplog.text and "longer than max_prompt_length=8" in caplog.text
    too_short = instantiate(fast_cfg("data.max_prompt_length=2").data, tokenizer=tiny_lm.tokenizer)
    with pytest.raises(ValueError, match="every prompt is longer than max_prompt_length"):
        too_short.setup("fit")


def test_tokenizer_without_pad_uses_eos_or_says_it_cannot_batch(tiny_lm, caplog):
    tokenizer = copy.deepcopy(tiny_lm.tokenizer)
    tokenizer.pad_token = None
    _ensure_pad_token(tokenizer, copy.deepcopy(tiny_lm.model))
    assert tokenizer.pad_token == tokenizer.eos_token
    assert "Tokenizer has no pad token: using EOS" in caplog.text
    tokenizer.pad_token = tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an EOS token: cannot batch"):
        _ensure_pad_token(tokenizer, tiny_lm.model)


@pytest.mark.parametrize("override", ["method.tau_sample=0", "method.tau_train=-1"])
def test_temperatures_must_be_positive(fast_cfg, override):
    with pytest.raises(ValueError, match=r"tau_(sample|train) must be > 0, got -?[01]"):
        build_components(fast_cfg("method=osft", override))


def test_group_size_below_one(fast_cfg):
    with pytest.raises(ValueError, match=r"group_size \(G\) must be >= 1, got 0"):
        build_components(fast_cfg("method=grpo", "method.group_size=0"))


@pytest.mark.parametrize("alpha", [0, 1.5])
def test_alpha_outside_the_unit_interval(alpha):
    cfg = compose_config(["experiment=feature_simulation", f"callbacks.feature_test.alpha={alpha}"])
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"), clear_errors():
        instantiate_group(cfg.callbacks)


def test_parrot_of_the_wrong_shape(tmp_path):
    path = tmp_path / "parrot.safetensors"
    save_file({"parrot": torch.zeros(6, 33)}, path)
    with pytest.raises(ValueError, match=r"holds shape \(6, 33\), but this model needs \(6, 32\)"):
        load_parrot(str(path), (6, 32))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(
    fast_cfg, tmp_path, monkeypatch
):
    nll_loss = SFTModule.nll_loss

    def nan_at_step_two(self, *args, **kwargs):
        loss, metrics = nll_loss(self, *args, **kwargs)
        return (loss * torch.nan if self.global_step == 2 else loss), metrics

    monkeypatch.setattr(SFTModule, "nll_loss", nan_at_step_two)
    cfg = fast_cfg("method=sft", "callbacks.step_checkpoint.every_n_train_steps=1")
    with pytest.raises(FloatingPointError, match=r"Non-finite loss \(nan\) at optimiser step 2"):
        run(cfg)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_resume_without_a_checkpoint_says_where_to_point(fast_cfg):
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: no checkpoint.*hydra\.run\.dir="):
        run(fast_cfg("ckpt_path=last"))


def test_a_trainer_number_given_as_text_names_the_knob(fast_cfg):
    with pytest.raises(ValueError, match="trainer.max_steps must be a number, got 'abc'"):
        run(fast_cfg("trainer.max_steps=abc"))


def test_a_user_error_prints_one_line_and_hydra_full_error_the_traceback(tmp_path):
    """From the command line: one line, exit status 1; HYDRA_FULL_ERROR=1 keeps the traceback."""
    command, env = cli_command(*FAST, "trainer.max_steps=abc", tmp_path=tmp_path)
    short = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    output = short.stdout + short.stderr
    assert short.returncode == 1
    assert "ValueError: trainer.max_steps must be a number, got 'abc'" in output
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output
    env = {**env, "HYDRA_FULL_ERROR": "1"}
    full = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert full.returncode == 1 and "Traceback" in full.stderr
    assert "trainer.max_steps must be a number" in full.stderr


@pytest.mark.parametrize("count", ["0", "two"])
def test_cpu_processes_that_are_not_a_positive_count_are_named(fast_cfg, monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="hardware.cpu_processes must be a positive integer"):
        run(fast_cfg(f"hardware.cpu_processes={count}"))


def test_a_k_above_the_sample_count_is_named(fast_cfg):
    with pytest.raises(ValueError, match="k=8 exceeds validation.n_samples=4"):
        build_components(fast_cfg("validation.n_samples=4", "validation.ks=[8]"))


def test_an_empty_model_directory_lists_what_was_expected(tmp_path, fast_cfg):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        ModelNotFoundError, match=r"empty' holds no model: .*config\.json.*found nothing"
    ):
        load_causal_lm(path=str(empty))
    (empty / "config.json").write_text("{}")  # a config but no tokenizer files
    with pytest.raises(
        ModelNotFoundError, match=r"tokenizer_config\.json.*found \['config\.json'\]"
    ):
        build_components(fast_cfg("model=qwen", f"model.path={empty}"))


@pytest.mark.parametrize("hardware", ["gpu", "fsdp"])
def test_a_gpu_option_without_a_gpu_suggests_the_cpu_options(fast_cfg, monkeypatch, hardware):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ValueError, match="no GPU is visible.*hardware=auto or hardware=cpu.*fsdp_sim"
    ):
        run(fast_cfg(f"hardware={hardware}"))


# ---- rollout engines ------------------------------------------------------------------------
# engine=vllm without vLLM, too old a vLLM, no GPU, a head_dim the CPU build refuses:
# tests/test_vllm_engine.py.
def test_paged_engine_without_continuous_batching_suggests_hf(monkeypatch):
    from transformers.generation.continuous_batching import ContinuousMixin

    from osftkit.rollout import PagedEngine

    monkeypatch.delattr(ContinuousMixin, "generate_batch")
    with pytest.raises(ImportError, match="use engine=hf"):
        PagedEngine()


def test_engine_settings_are_checked_at_construction(tiny_lm):
    from osftkit.rollout import HFGenerateEngine, PagedEngine

    with pytest.raises(ValueError, match="engine.max_batch_tokens must be >= 1"):
        HFGenerateEngine(max_batch_tokens=0)
    with pytest.raises(TypeError, match="pages"):
        PagedEngine({"pages": 3})
    ids, mask = torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="engine=paged cannot generate from prompt embeddings"):
        PagedEngine().generate(
            tiny_lm.model,
            ids,
            mask,
            num_samples=1,
            temperature=0.0,
            top_p=1.0,
            max_new_tokens=2,
            eos_token_id=1,
            pad_token_id=0,
            prompt_embeds=torch.zeros(1, 2, tiny_lm.model.config.hidden_size),
        )
