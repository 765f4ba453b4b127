"""The memory planner: parameter counts, the 7B presets on 8 x 80 GB, bad knobs, and its
training-step estimate against the measured peak of a real step on three small CPU configs."""

import json
import os
import subprocess
import sys

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

from osftkit.models.tiny import build_byte_tokenizer
from osftkit.plan import GIB, KNOWN_SHAPES, Shape, estimate, split_overrides
from tests.conftest import ROOT, compose_config


@pytest.mark.parametrize(("tied", "layers"), [(True, 2), (False, 3)])
def test_parameter_count_is_the_models(tied, layers):
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    assert Shape.from_config(config.to_dict()).params() == Qwen2ForCausalLM(config).num_parameters()


def test_known_7b_shape_is_the_published_size():
    assert KNOWN_SHAPES["Qwen/Qwen2.5-Math-7B"].params() / 1e9 == pytest.approx(7.62, abs=0.01)


@pytest.mark.parametrize("experiment", ["osft_qwen_math_7b_dsr", "grpo_qwen_math_7b_dsr"])
def test_7b_presets_fit_on_8_gpus_of_80_gb(experiment):
    plan = estimate(compose_config([f"experiment={experiment}"]), gpu_memory_gb=80, num_gpus=8)
    assert plan.fits, plan.rows
    assert plan.train_peak < 80 * GIB and plan.rollout_peak < 80 * GIB


def test_without_micro_batches_grpo_7b_does_not_fit():
    cfg = compose_config(["experiment=grpo_qwen_math_7b_dsr", "method.micro_batch_size=null"])
    assert not estimate(cfg, gpu_memory_gb=80, num_gpus=8).fits


def test_bad_planner_input():
    with pytest.raises(ValueError, match=r"unknown planner knob plan.gpus"):
        split_overrides(["plan.gpus=8"])
    with pytest.raises(ValueError, match=r"plan.num_gpus"):
        estimate(compose_config(["experiment=osft_qwen_math_7b_dsr"]))
    cfg = compose_config(["model=qwen", "model.path=some-org/unknown-model"])
    with pytest.raises(ValueError, match=r"plan.model_config=<model dir or config.json>"):
        estimate(cfg)


@pytest.fixture(scope="module")
def wide_vocab_model(tmp_path_factory):
    """A small model with a 32k vocabulary, where the log-prob path and the embeddings weigh."""
    directory = tmp_path_factory.mktemp("wide_vocab")
    config = Qwen2Config(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(config).save_pretrained(directory)
    build_byte_tokenizer().save_pretrained(directory)
    return directory


SMALL = ["hardware=cpu", "data.max_prompt_length=64"]
CONFIGS = {
    "sft_tiny_activations": ["model=tiny", "method=sft", "data.batch_size=8"]
    + ["data.max_response_length=448"],
    "osft_wide_vocab_logprobs": ["model=qwen", "method=osft", "data.batch_size=4"]
    + ["data.max_response_length=192", "method.logprob_chunk_size=512", "model.dtype=float32"],
    "grpo_checkpointed_kl_micro": ["model=tiny", "method=grpo", "data.batch_size=4"]
    + ["data.max_response_length=448", "method.group_size=2", "method.kl_coef=0.1"]
    + ["method.micro_batch_size=2", "model.gradient_checkpointing=true"]
    + ["model.tiny.hidden_size=256", "model.tiny.intermediate_size=1024"],
}


@pytest.mark.parametrize("name", CONFIGS)
def test_estimate_within_25_percent_of_the_measured_step(name, tmp_path, wide_vocab_model):
    extra = [f"model.path={wide_vocab_model}"] if "wide_vocab" in name else []
    command = [
        sys.executable,
        "-m",
        "osftkit.plan",
        *SMALL,
        *CONFIGS[name],
        *extra,
        f"paths.model_dir={tmp_path / 'models'}",
        f"paths.output_dir={tmp_path / 'run'}",
        "plan.measure=true",
    ]
    env = {**os.environ, "OSFTKIT_ROOT": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    ratio = figures["estimate_train_peak_bytes"] / figures["measured_train_peak_bytes"]
    print(name, figures, f"estimate / measured = {ratio:.3f}")
    assert 0.75 <= ratio <= 1.25
