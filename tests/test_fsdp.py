"""FSDP2 on 2 CPU processes over gloo: gathers per rollout, exact data-parallel training, the
fp32-master rule, sharded checkpoints, and `hardware=fsdp_sim` end to end."""

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp._fully_shard import _fsdp_param_group
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from osftkit.hardware import (
    FSDP2Strategy,
    average_gradients_outside_fsdp,
    broadcast_from_rank0,
    check_master_weights,
    consolidated_state_dict,
    gathered_weights,
    shard_model,
    swap_in,
)
from osftkit.methods import SFTModule
from osftkit.methods.losses import mean_tokens_over_ranks, token_weights
from osftkit.models.loading import load_causal_lm, resolve_path
from osftkit.models.logprobs import token_logprobs
from osftkit.recipes import SFTRecipe
from osftkit.rollout import HFGenerateEngine
from tests.conftest import FAST, cli, compose_config

WORLD = 2
BACKDOOR = ["model=tiny", "data=instructions", "data.train.size=64",
            "data.val.instructions.size=8", "data.val_batch_size=8", "callbacks.progress_bar=null",
            "validation.n_samples=1", "validation.ks=[1]"]  # fmt: skip
PROMPTS = ["12+7=", "3+4=", "40+2=", "9+9="]  # two per rank


def tiny_dir(tmp_path: Path) -> str:
    cfg = compose_config(["model=tiny"])
    return resolve_path(None, str(tmp_path / "models"), dict(cfg.model.tiny))


def spawn(worker, tmp_path: Path, *args) -> list[dict]:
    """Run `worker(rank, tmp_path, *args)` on 2 gloo ranks; each returns a JSON-able dict."""
    mp.spawn(_init_and_run, args=(str(tmp_path), worker, args), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _init_and_run(rank: int, tmp_path: str, worker, args: tuple) -> None:
    torch.set_num_threads(1)
    init = f"file://{tmp_path}/rendezvous"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        result = worker(rank, Path(tmp_path), *args)
        (Path(tmp_path) / f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def sharded(directory: str) -> tuple[torch.nn.Module, AutoTokenizer]:
    model = AutoModelForCausalLM.from_pretrained(directory)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("data_parallel",))
    shard_model(model, (Qwen2DecoderLayer,), mesh["data_parallel"])
    return model, AutoTokenizer.from_pretrained(directory)


def prompt_batch(tokenizer, prompts: list[str]) -> dict:
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    return {"prompt_ids": encoded.input_ids, "prompt_mask": encoded.attention_mask}


def count_all_gathers() -> list[int]:
    """Patch FSDP2's all-gather of a unit's parameters (in this spawned process only); the
    returned list grows by one per all-gather."""
    calls: list[int] = []
    original = _fsdp_param_group.foreach_all_gather

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    _fsdp_param_group.foreach_all_gather = counted
    return calls


def gather_worker(rank: int, tmp_path: Path, directory: str) -> dict:
    model, tokenizer = sharded(directory)
    units = sum(1 for _ in model.modules() if hasattr(_, "unshard"))
    module = SFTModule(model, tokenizer, SFTRecipe(optimizer=torch.optim.AdamW))
    batch = prompt_batch(tokenizer, PROMPTS[2 * rank : 2 * rank + 2])
    calls = count_all_gathers()
    steps = 12
    # Before: generate on the sharded model, every unit gathered at each decoding step (both
    # ranks decode exactly `steps` steps: their per-step gathers must pair up).
    with torch.no_grad():
        model.generate(**{"input_ids": batch["prompt_ids"], "attention_mask": batch["prompt_mask"]},
                       min_new_tokens=steps, max_new_tokens=steps, do_sample=False)  # fmt: skip
    before = len(calls)
    # After: one gather per unit for the whole rollout, whatever its length. The ranks decode
    # different numbers of steps: any collective between steps would hang here.
    counts = []
    for length in (4 + 8 * rank, 24 + 8 * rank):
        calls.clear()
        greedy = module.generate(batch, 1, 0.0, 1.0, length)
        counts.append(len(calls))
    full = AutoModelForCausalLM.from_pretrained(directory)  # reference: the unsharded model
    expected = HFGenerateEngine().generate(
        full, batch["prompt_ids"], batch["prompt_mask"], num_samples=1, temperature=0.0,
        top_p=1.0, max_new_tokens=length, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    # Training works after the rollout: the layers reshard again after forward.
    logp, _ = token_logprobs(
        model,
        input_ids=greedy.sequences,
        attention_mask=greedy.attention_mask,
        score_mask=greedy.loss_mask,
    )
    logp.sum().backward()
    return {
        "units": units,
        "before": before,
        "after": counts,
        "same_as_unsharded": torch.equal(greedy.response_ids, expected.response_ids),
        "steps": steps,
    }


def test_a_rollout_gathers_each_fsdp_unit_once_whatever_its_length(tmp_path):
    results = spawn(gather_worker, tmp_path, tiny_dir(tmp_path))
    for result in results:
        assert result["units"] == 4  # 3 decoder layers + the root
        # At most one all-gather per unit (the root may still be gathered from the forward
        # before), the same for 4 or 32 decoding steps.
        assert result["after"][1] == result["units"] >= result["after"][0], result
        assert result["before"] == 1 + result["steps"] * 3, result  # each layer, every step
        assert result["same_as_unsharded"]
    print("all-gathers per 12-step rollout: before", results[0]["before"], "after",
          results[0]["after"][0])  # fmt: skip


def train_steps(model: torch.nn.Module, batch: dict, steps: int) -> None:
    """The kit's optimiser step: log-probs, loss, backward, clip by norm, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        logp, _ = token_logprobs(
            model,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            score_mask=batch["loss_mask"],
        )
        # The kit's token-mean over the ranks' mean token count: the ranks hold different token
        # counts (10 and 11), and averaged gradients still equal the one-process token mean.
        mask = batch["loss_mask"]
        weights = token_weights(mask, "token-mean", mean_tokens=mean_tokens_over_ranks(mask))
        loss = (-logp * weights).sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()


def sequences(tokenizer, rows: slice) -> dict:
    tokenizer.padding_side = "right"
    texts = [p + str(eval(p[:-1])) for p in PROMPTS]  # noqa: S307 - our own arithmetic
    encoded = tokenizer(texts[rows], return_tensors="pt", padding="max_length", max_length=12)
    mask = encoded.attention_mask
    return {"input_ids": encoded.input_ids, "attention_mask": mask, "loss_mask": mask[:, 1:]}


def training_worker(rank: int, tmp_path: Path, directory: str) -> dict:
    model, tokenizer = sharded(directory)
    train_steps(model, sequences(tokenizer, slice(2 * rank, 2 * rank + 2)), steps=3)
    weights = consolidated_state_dict(model)
    if rank == 0:
        torch.save(weights, tmp_path / "fsdp.pt")
    return {"greedy": greedy_ids(model, tokenizer)}


def greedy_ids(model: torch.nn.Module, tokenizer) -> list[list[int]]:
    batch = prompt_batch(tokenizer, PROMPTS)
    with gathered_weights(model):
        rollouts = HFGenerateEngine().generate(
            model, batch["prompt_ids"], batch["prompt_mask"], num_samples=1, temperature=0.0,
            top_p=1.0, max_new_tokens=8, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    return rollouts.response_ids.tolist()


def test_two_rank_fsdp2_training_equals_one_process_on_the_same_global_batch(tmp_path):
    directory = tiny_dir(tmp_path)
    results = spawn(training_worker, tmp_path, directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    train_steps(model, sequences(tokenizer, slice(0, 4)), steps=3)
    sharded_weights = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    start = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    for name, value in model.state_dict().items():
        assert not torch.equal(value, start[name]) or "norm" in name, f"{name} did not train"
        torch.testing.assert_close(sharded_weights[name], value, atol=1e-5, rtol=0, msg=name)
    assert results[0]["greedy"] == results[1]["greedy"] == greedy_ids(model, tokenizer)


def rank0_load_worker(rank: int, tmp_path: Path, directory: str) -> dict:
    """hardware=fsdp's loading: rank 1 is launched as such (LOCAL_RANK=1, as Lightning's launcher
    and torchrun set it) and builds on meta; rank 0's weights are broadcast into the shards."""
    import os

    os.environ["LOCAL_RANK"] = str(rank)
    loaded = load_causal_lm(path=directory, rank0_loads=True)
    built_on_meta = next(loaded.model.parameters()).is_meta
    full = loaded.model.state_dict() if rank == 0 else None
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("data_parallel",))
    shard_model(loaded.model, (Qwen2DecoderLayer,), mesh["data_parallel"])
    broadcast_from_rank0(loaded.model, full, torch.device("cpu"))
    weights = consolidated_state_dict(loaded.model)  # gathers rank 1's shards onto rank 0
    if rank == 0:
        torch.save(weights, tmp_path / "rank0_loaded.pt")
    buffers = {n: b.tolist() for n, b in loaded.model.named_buffers()}
    return {"meta": built_on_meta, "buffers": buffers, "greedy": greedy_ids(loaded.model,
            loaded.tokenizer), "eos": loaded.model.generation_config.eos_token_id}  # fmt: skip


def test_rank0_loads_and_the_others_get_equal_shards(tmp_path):
    """One host copy of the weights per run: rank 1 builds nothing, and the sharded model then
    equals the one every rank loaded itself (weights, RoPE buffers, greedy outputs)."""
    directory = tiny_dir(tmp_path)
    results = spawn(rank0_load_worker, tmp_path, directory)
    assert [r["meta"] for r in results] == [False, True]
    reference = load_causal_lm(path=directory)
    received = torch.load(tmp_path / "rank0_loaded.pt", weights_only=True)
    for name, value in reference.model.state_dict().items():
        assert torch.equal(received[name], value), name
    buffers = {n: b.tolist() for n, b in reference.model.named_buffers()}
    assert results[0]["buffers"] == results[1]["buffers"] == buffers
    expected = greedy_ids(reference.model, reference.tokenizer)
    assert results[0]["greedy"] == results[1]["greedy"] == expected
    assert results[1]["eos"] == reference.model.generation_config.eos_token_id


def averaging_worker(rank: int, tmp_path: Path, directory: str) -> dict:
    model, _ = sharded(directory)
    parrot = torch.nn.Parameter(torch.zeros(3))
    parrot.grad = torch.full((3,), float(rank + 1))  # ranks disagree: 1 and 2
    weight = model.get_output_embeddings().weight
    weight.grad = weight.detach().clone()  # a sharded gradient (a DTensor): left alone
    before = weight.grad.to_local().clone()
    average_gradients_outside_fsdp([parrot, weight])
    return {
        "parrot": parrot.grad.tolist(),
        "dtensor_untouched": torch.equal(weight.grad.to_local(), before),
    }


def test_gradients_outside_the_sharded_model_are_averaged_over_ranks(tmp_path):
    results = spawn(averaging_worker, tmp_path, tiny_dir(tmp_path))
    for result in results:
        assert result["parrot"] == [1.5, 1.5, 1.5] and result["dtensor_untouched"]


def test_training_bf16_weights_without_an_fp32_copy_fails_at_start(tiny_lm):
    check_master_weights(p for p in tiny_lm.model.parameters())  # fp32: fine
    bf16 = [torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)]
    with pytest.raises(ValueError, match="no fp32 master copy.*leave hardware.precision unset"):
        check_master_weights(bf16)


def test_a_bf16_true_run_is_refused_before_the_first_step(fast_cfg):
    from osftkit.train import run

    with pytest.raises(ValueError, match="no fp32 master copy"):
        run(fast_cfg("method=sft", "+hardware.precision=bf16-true", "validate_before_fit=false"))


def test_fsdp_names_a_layer_class_the_model_lacks(tiny_lm):
    mesh = None  # never reached: the class check comes first
    with pytest.raises(ValueError, match="hardware.strategy.layer_classes: no module of"):
        shard_model(tiny_lm.model, (torch.nn.Conv2d,), mesh)


def test_fsdp_strategy_refuses_an_unknown_dtype():
    with pytest.raises(ValueError, match="hardware.strategy.param_dtype"):
        FSDP2Strategy(layer_classes=["torch.nn.Linear"], param_dtype="fp8")


def test_a_checkpoint_swap_never_leaves_no_checkpoint(tmp_path):
    path, scratch = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    for step in (1, 2):
        scratch.mkdir()
        (scratch / "meta.pt").write_text(str(step))
        swap_in(scratch, path)
        assert (path / "meta.pt").read_text() == str(step) and not scratch.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_gathered_weights_passes_through_an_unsharded_model(tiny_lm):
    with gathered_weights(tiny_lm.model):
        pass


@pytest.mark.parametrize("rank0_loads", [False, True])
def test_fsdp_sim_osft_runs_end_to_end_from_the_cli(tmp_path, rank0_loads):
    """Also as hardware=fsdp loads (rank 0 only): the policy and its KL reference copy."""
    result = cli(*FAST, "method=osft", "hardware=fsdp_sim", "debug=fast", "task_name=fsdp",
                 "method.kl_coef=0.1", f"hardware.strategy.rank0_loads={rank0_loads}",
                 tmp_path=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "distributed_backend=gloo" in output and "val/pass@1" in output
    assert ("rank 1 builds the model on the meta device" in output) == rank0_loads


def test_multinode_shards_over_nodes_times_processes(tmp_path):
    """hardware=multinode is FSDP2 over num_nodes x devices ranks: two "nodes" of one CPU
    process each, launched as a cluster launcher does (NODE_RANK, LOCAL_RANK, WORLD_SIZE, the
    master's address), train OSFT through one FSDP2 mesh of 2; node 1 builds on meta."""
    import socket
    import subprocess

    from tests.conftest import cli_command

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [*FAST, "method=osft", "hardware=multinode", "hardware.accelerator=cpu",
            "hardware.devices=1", "hardware.num_threads=1", "debug=fast",
            "+hardware.strategy.process_group_backend=gloo",
            f"hydra.run.dir={tmp_path}/run"]  # fmt: skip
    nodes = []
    for node in range(2):
        command, env = cli_command(*args, tmp_path=tmp_path)
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node),
                   LOCAL_RANK="0", WORLD_SIZE="2")  # fmt: skip
        output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        nodes.append(subprocess.Popen(command, env=env, cwd=tmp_path, **output))
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "Starting with 2 processes" in outputs[0] and "val/pass@1" in outputs[0]
    assert "MEMBER: 2/2" in outputs[1]  # node 1's process is global rank 1 of the one mesh
    assert "rank 1 builds the model on the meta device" in outputs[1]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_fsdp_sim_runs_each_method(tmp_path, method):
    extra = ["method.group_size=2"] if method == "grpo" else []
    result = cli(*FAST, f"method={method}", *extra, "hardware=fsdp_sim", "debug=fast",
                 tmp_path=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra"), [("sande", ["method.simulate_steps=1"]), ("overwrite_sft", [])]
)
def test_fsdp_sim_runs_the_backdoor_removals(tmp_path, method, extra):
    """SANDE's parrot is spliced inside the model's forward (where FSDP2 has gathered the
    embeddings) and its gradient averaged over the ranks; Overwrite SFT inserts the trigger
    as text."""
    steps = ["trainer.max_steps=3", "trainer.val_check_interval=3"]
    result = cli(*BACKDOOR, f"method={method}", *extra, "hardware=fsdp_sim", *steps,
                 tmp_path=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "distributed_backend=gloo" in output and "val/asr_greedy" in output
    if method == "sande":
        assert "val/parrot_asr" in output and list(tmp_path.rglob("parrot.safetensors"))


def test_a_kill_between_the_two_renames_of_a_swap_still_resumes(fast_cfg, tmp_path):
    from osftkit.train import resume_checkpoint

    old = tmp_path / "run" / "checkpoints" / "last.ckpt.old"
    old.mkdir(parents=True)
    assert resume_checkpoint(fast_cfg("ckpt_path=last")) == str(old)


def test_a_lora_export_under_fsdp_is_refused_before_training(fast_cfg, tmp_path):
    from osftkit.train import run

    lora = "+model.lora={r: 4, target_modules: [q_proj, v_proj]}"
    cfg = fast_cfg("method=sft", "hardware=fsdp_sim", lora, f"export_dir={tmp_path / 'e'}")
    with pytest.raises(ValueError, match="export_dir with model.lora under hardware=fsdp"):
        run(cfg)


def lookup_worker(rank: int, tmp_path: Path, directory: str) -> dict:
    model, _ = sharded(directory)
    ids = torch.tensor([[1, 2, 3]])
    try:
        model.get_input_embeddings()(ids)
        message = ""
    except ValueError as error:
        message = str(error)
    with gathered_weights(model):
        shape = list(model.get_input_embeddings()(ids).shape)
    return {"message": message, "gathered_shape": shape}


def test_a_sharded_embedding_lookup_outside_the_forward_says_what_to_do(tmp_path):
    for result in spawn(lookup_worker, tmp_path, tiny_dir(tmp_path)):
        assert "called outside the model's forward" in result["message"]
        assert "gathered_weights" in result["message"] and result["gathered_shape"][:2] == [1, 3]


@pytest.mark.parametrize("decodes_with_policy", [True, False])
def test_the_policy_is_gathered_only_for_engines_that_decode_with_it(
    tiny_lm, monkeypatch, decodes_with_policy
):
    import osftkit.methods.generation as generation

    gathered = []

    @contextmanager
    def recording(model):
        gathered.append(model)
        yield

    monkeypatch.setattr(generation, "gathered_weights", recording)
    engine = HFGenerateEngine()
    engine.decodes_with_policy = decodes_with_policy  # False: as VLLMEngine, its own copy
    module = SFTModule(tiny_lm.model, tiny_lm.tokenizer, SFTRecipe(), engine=engine)
    rollouts = module.generate(prompt_batch(tiny_lm.tokenizer, PROMPTS), 1, 0.0, 1.0, 2)
    assert rollouts.response_ids.shape == (len(PROMPTS), 2)
    assert gathered == ([tiny_lm.model] if decodes_with_policy else [])


def test_engines_say_whether_they_decode_with_the_policy():
    from osftkit.rollout.paged import PagedEngine
    from osftkit.rollout.vllm_engine import VLLMEngine

    assert HFGenerateEngine.decodes_with_policy and PagedEngine.decodes_with_policy
    assert not VLLMEngine.decodes_with_policy
