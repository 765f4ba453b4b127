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


SEVEN_B = ["osft_qwen_math_7b_dsr", "grpo_qwen_math_7b_dsr", "sept_qwen_math_7b_dsr"]


@pytest.mark.parametrize("experiment", SEVEN_B)
def test_7b_presets_fit_on_8_gpus_of_80_gb(experiment):
    """With vLLM counted: its budget beside the training shard, and a KV cache that holds the
    rows it runs at once (no preemption warning)."""
    plan = estimate(compose_config([f"experiment={experiment}"]), gpu_memory_gb=80, num_gpus=8)
    assert plan.fits, plan.rows
    assert plan.train_peak < 80 * GIB and plan.rollout_peak < 80 * GIB
    assert plan.warnings == []
    rows = {what: value for what, value, _ in plan.rows}
    assert rows["vLLM budget"] == 0.45 * 80 * GIB
    assert rows["  its KV cache"] >= rows["rollout KV need"]
    assert rows["vLLM asleep (GPU)"] == 0  # sleep level 2
    assert "rollout KV cache" not in rows  # the HF-generate rollout does not run


def rows_of(plan) -> dict[str, float]:
    return {what: value for what, value, _ in plan.rows + plan.host_rows}


def test_a_rollout_the_vllm_cache_cannot_hold_names_the_knob():
    """The preset at the issue's old settings (0.3 of the GPU, vLLM's default 1,024 sequences):
    ~84k tokens of KV for a 1,049k-token validation rollout (8 prompts x n = 32)."""
    cfg = compose_config(
        ["experiment=osft_qwen_math_7b_dsr", "engine.gpu_memory_utilization=0.3",
         "engine.max_num_seqs=null", "engine.max_num_batched_tokens=null"]
    )  # fmt: skip
    plan = estimate(cfg, gpu_memory_gb=80, num_gpus=8)
    (warning,) = plan.warnings
    assert "validation rollout holds up to 1049k tokens of KV (256 rows x 4096)" in warning
    assert "engine.max_num_seqs=20" in warning and "engine.gpu_memory_utilization" in warning
    capacity = rows_of(plan)["  its KV cache"] / (2 * 28 * 4 * 128 * 2)  # bf16 K and V
    assert 20 * 4096 <= capacity < 21 * 4096
    starved = compose_config(
        ["experiment=osft_qwen_math_7b_dsr", "engine.gpu_memory_utilization=0.15"]
    )
    (warning,) = estimate(starved, gpu_memory_gb=80, num_gpus=8).warnings
    assert "leaves no KV cache" in warning and "raise engine.gpu_memory_utilization" in warning


@pytest.mark.parametrize("level", [0, 1, 2])
def test_vllm_sleep_level_decides_what_stays_on_the_gpu_and_the_host(level):
    cfg = compose_config(["experiment=osft_qwen_math_7b_dsr", f"engine.sleep_level={level}"])
    plan = estimate(cfg, gpu_memory_gb=80, num_gpus=8)
    rows = rows_of(plan)
    budget = 0.45 * 80 * GIB
    assert rows["vLLM asleep (GPU)"] == (budget if level == 0 else 0)
    stepping = estimate(compose_config(["experiment=osft_qwen_math_7b_dsr"]), 80, 8).train_peak
    assert plan.train_peak == stepping + (budget if level == 0 else 0)
    pinned = rows.get("vLLM sleep level 1, per node", 0)
    params = KNOWN_SHAPES["Qwen/Qwen2.5-Math-7B"].params()
    assert pinned == (params * 2 * 8 if level == 1 else 0)  # bf16 weights of 8 ranks


def test_fsdp_root_unit_autocast_copies_host_and_disk_rows():
    shape = KNOWN_SHAPES["Qwen/Qwen2.5-Math-7B"]
    root = shape.vocab_size * shape.hidden_size * 2 + shape.hidden_size
    fsdp = rows_of(estimate(compose_config(["experiment=osft_qwen_math_7b_dsr"]), 80, 8))
    assert fsdp["FSDP root unit"] == root * 2 * 2  # bf16 weights + grads, unsharded
    assert "autocast weight copies" not in fsdp
    assert fsdp["host at load, per node (8 ranks)"] == shape.params() * 4  # rank 0 loads
    assert fsdp["checkpoint on disk, full"] == shape.params() * 12
    assert fsdp["checkpoint on disk, weights only"] == shape.params() * 4
    gpu = rows_of(estimate(compose_config(["model=qwen", "hardware=gpu"]), 141))
    small = KNOWN_SHAPES["Qwen/Qwen2.5-Math-1.5B"]
    assert gpu["autocast weight copies"] == small.params() * 2
    assert "FSDP root unit" not in gpu
    ddp = rows_of(estimate(compose_config(["model=qwen", "hardware=ddp"]), 80, 4))
    assert ddp["host at load, per node (4 ranks)"] == small.params() * 4 * 4  # every rank


def test_multinode_plans_all_nodes_gpus_as_fsdp_shards():
    """hardware=multinode: 2 nodes x 8 GPUs = 16 shards; the 7B preset fits with room."""
    cfg = compose_config(["experiment=osft_qwen_math_7b_dsr", "hardware=multinode"])
    plan = estimate(cfg)
    rows = rows_of(plan)
    assert rows["parameters"] == KNOWN_SHAPES["Qwen/Qwen2.5-Math-7B"].params() * 4 / 16
    assert "host at load, per node (8 ranks)" in rows and plan.fits


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
