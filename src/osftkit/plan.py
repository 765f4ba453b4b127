"""Memory planner: per-GPU bytes of a config's training step and rollouts, before a GPU is rented.

    python -m osftkit.plan experiment=osft_qwen_math_7b_dsr plan.num_gpus=8 plan.gpu_memory_gb=80

Takes the same overrides as train.py, plus `plan.*` knobs (not part of the train config):
  plan.gpu_memory_gb   memory of one GPU (default 80)
  plan.num_gpus        GPUs the run uses (default: hardware.devices; needed when it is -1)
  plan.model_config    a model directory or config.json to read the shape from (default: the
                       local model.path, the tiny spec, or the table of known hub ids below)
  plan.measure         also run one real training step of the config on this machine (CPU) and
                       print its measured peak beside the estimate

The estimate of one training step = parameters + gradients + AdamW's two states (all in the
trained dtype, sharded over the GPUs under FSDP) + the activations autograd keeps for one
micro-batch (every layer's, or with checkpointing only the layer inputs plus one layer's
recompute) + the chunked log-prob peak. A rollout holds the full weights (gathered once when
sharded), the optimiser state and the KV cache of the rollout batch (HF generate; vLLM
preallocates its own pool instead). The larger of the two must fit.
"""

import ctypes
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import Tensor

from osftkit.methods.micro_batches import TokenBatch
from osftkit.methods.optimisation import MicroLoss, backpropagate, weighted
from osftkit.models.loading import DTYPES
from osftkit.models.tiny import TinyQwen2Spec, build_byte_tokenizer
from osftkit.models.word_tokenizer import build_word_tokenizer
from osftkit.recipes import GRPORecipe, RolloutRecipe

GIB = 2**30
FP32 = 4
M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
PLAN_KNOBS = ("gpu_memory_gb", "num_gpus", "model_config", "measure")


@dataclass(frozen=True)
class Shape:
    """What the planner needs of a decoder-only transformer (names as in HF config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    attention_bias: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_params(self) -> int:
        d, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = 2 * d * d + 2 * d * kv + (d + 2 * kv if self.attention_bias else 0)
        return attention + 3 * d * self.intermediate_size + 2 * d

    def params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * self.layer_params() + self.hidden_size

    def layer_activation_bytes(self, dtype_bytes: int) -> int:
        """Bytes autograd keeps per token in one decoder layer (flash / memory-efficient
        attention: no tokens x tokens scores): two RMSNorms, q/k
        before and after RoPE, attention inputs and output, and the MLP's gate, up, SiLU and
        product."""
        d, heads = self.hidden_size, self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        # RMSNorm keeps its fp32 input and normalised output, and (below fp32) the cast back.
        norms = 2 * d * (2 * FP32 + (dtype_bytes if dtype_bytes != FP32 else 0))
        rope = 2 * dtype_bytes * (heads + kv)
        attention = dtype_bytes * (2 * heads + 2 * kv)
        mlp = 4 * dtype_bytes * self.intermediate_size
        return norms + rope + attention + mlp

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Shape":
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v biases; Llama-style configs say so in `attention_bias`.
            attention_bias=config.get("attention_bias", config.get("model_type") == "qwen2"),
        )


# From each model's official config.json on the hub (so presets plan offline).
KNOWN_SHAPES = {
    "Qwen/Qwen2.5-Math-7B": Shape(152064, 3584, 18944, 28, 28, 4, False, True),
    "Qwen/Qwen2.5-Math-1.5B": Shape(151936, 1536, 8960, 28, 12, 2, True, True),
    "Qwen/Qwen1.5-4B": Shape(151936, 2560, 6912, 40, 20, 20, False, True),
    "meta-llama/Llama-3.1-8B-Instruct": Shape(128256, 4096, 14336, 32, 32, 8, False, False),
}


def model_shape(cfg: DictConfig, model_config: str | None) -> Shape:
    """The model's shape: plan.model_config, the local model.path, the tiny spec, or the table."""
    if model_config:
        path = Path(model_config)
        return Shape.from_config(
            json.loads((path / "config.json" if path.is_dir() else path).read_text())
        )
    path = cfg.model.get("path")
    if path and (Path(path) / "config.json").exists():
        return Shape.from_config(json.loads((Path(path) / "config.json").read_text()))
    if cfg.model.get("tiny") is not None:
        spec = TinyQwen2Spec(**cfg.model.tiny)
        words = cfg.model.get("words")
        vocab = len(build_byte_tokenizer() if words is None else build_word_tokenizer(words))
        return Shape(
            vocab, spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers,
            spec.num_attention_heads, spec.num_key_value_heads, True, True,
        )  # fmt: skip
    if path in KNOWN_SHAPES:
        return KNOWN_SHAPES[path]
    raise ValueError(
        f"plan: no shape for model '{path}': give plan.model_config=<model dir or config.json> "
        f"(known hub ids: {sorted(KNOWN_SHAPES)})"
    )


@dataclass
class Plan:
    """Per-GPU bytes of one training step and one rollout."""

    rows: list[tuple[str, float, str]]  # (what, bytes, how it was counted)
    train_peak: float
    rollout_peak: float
    gpu_bytes: float
    host_rows: list[tuple[str, float, str]] = field(default_factory=list)  # host RAM, disk
    warnings: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.train_peak, self.rollout_peak)

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_bytes


def sharded(cfg: DictConfig) -> bool:
    strategy = cfg.hardware.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    return bool(re.search(r"FSDP|ModelParallel", str(target)))


def checkpointed(cfg: DictConfig) -> bool:
    return bool(cfg.model.get("gradient_checkpointing"))


def estimate(
    cfg: DictConfig,
    gpu_memory_gb: float = 80,
    num_gpus: int | None = None,
    model_config: str | None = None,
) -> Plan:
    """Per-GPU memory of `cfg` (a composed train config) on `num_gpus` GPUs."""
    shape = model_shape(cfg, model_config)
    devices = int(cfg.hardware.get("devices", 1))
    gpus = num_gpus or devices * int(cfg.hardware.get("num_nodes", 1))  # multinode: all nodes'
    if gpus < 1:
        raise ValueError("plan: hardware.devices is -1 (all GPUs): say how many with plan.num_gpus")
    method, data, validation = cfg.method, cfg.data, cfg.validation
    # Training keeps fp32 master weights (and fp32 gradients and AdamW state); `model.dtype` is
    # the compute dtype: activations, FSDP's gathered weights, the rollout's weights and KV cache.
    param_bytes = FP32
    compute_bytes = DTYPES[cfg.model.get("dtype", "float32")].itemsize
    shards = gpus if sharded(cfg) else 1
    params = shape.params()
    rollout_rows = isinstance(OmegaConf.to_object(method), RolloutRecipe)
    response = method.max_new_tokens if rollout_rows else data.max_response_length
    tokens_per_row = data.max_prompt_length + response
    rows = data.batch_size // gpus
    if rollout_rows:
        rows = rows * method.group_size // method.get("num_minibatches", 1)
    if method.get("max_tokens_per_micro_batch"):
        micro_tokens, micro_rows = method.max_tokens_per_micro_batch, None
    else:
        micro_rows = min(method.get("micro_batch_size") or rows, rows)
        micro_tokens = micro_rows * tokens_per_row
    layer_acts = shape.layer_activation_bytes(compute_bytes) * micro_tokens
    layer_inputs = shape.num_hidden_layers * compute_bytes * shape.hidden_size * micro_tokens
    # Backward of a layer holds gradients as large as that layer's activations; with
    # checkpointing the layer is also recomputed first.
    full_acts = (shape.num_hidden_layers + 1) * layer_acts
    ckpt_acts = layer_inputs + 2 * layer_acts
    scored = micro_rows * response if micro_rows else micro_tokens
    chunk = min(method.get("logprob_chunk_size", 256), scored)
    # One chunk's logits in the compute dtype (when that is not fp32) and 5 fp32 tensors of its
    # size at the backward peak: the fp32 logits, logsumexp's exp, its gradient, the gather's
    # gradient and their sum (measured: 5.0 on CPU).
    logprob = (
        chunk * shape.vocab_size * (5 * FP32 + (compute_bytes if compute_bytes != FP32 else 0))
    )
    weights = params * param_bytes / shards
    gathered = 2 * shape.layer_params() * compute_bytes if shards > 1 else 0  # FSDP prefetch
    reference = weights if method.get("kl_coef", 0) > 0 else 0
    grads, optimizer = weights, 2 * weights
    acts = ckpt_acts if checkpointed(cfg) else full_acts
    train_peak = weights + gathered + reference + grads + optimizer + acts + logprob
    kv_per_token = 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim
    val_rows = data.val_batch_size // gpus * validation.n_samples
    train_gen_rows = data.batch_size // gpus * (method.group_size if rollout_rows else 0)
    gen_rows = max(val_rows, train_gen_rows)
    gen_tokens = data.max_prompt_length + max(
        validation.max_new_tokens, response if rollout_rows else 0
    )
    kv_cache = gen_rows * gen_tokens * kv_per_token * compute_bytes
    full_weights = params * compute_bytes if shards > 1 else 0  # gathered in the compute dtype
    rollout_peak = weights + full_weights + reference + optimizer + kv_cache
    micro = f"{micro_rows} rows x {tokens_per_row}" if micro_rows else f"budget {micro_tokens}"
    table = [
        ("parameters", weights, f"{params / 1e9:.2f} B x {param_bytes} B / {shards} shard(s)"),
        ("FSDP gathered layers", gathered, "2 decoder layers unsharded (compute + prefetch)"),
        ("KL reference model", reference, "a frozen copy when kl_coef > 0"),
        ("gradients", grads, "as the parameters"),
        ("optimizer state (AdamW)", optimizer, "2 x the parameters"),
        ("activations, no checkpointing", full_acts, f"micro-batch {micro} tokens"),
        ("activations, checkpointing", ckpt_acts, "layer inputs + one layer recomputed"),
        ("log-prob peak", logprob, f"{chunk} positions x {shape.vocab_size} vocab"),
        (
            "training step peak",
            train_peak,
            "checkpointing " + ("on" if checkpointed(cfg) else "off"),
        ),
        ("rollout KV cache", kv_cache, f"{gen_rows} rows x {gen_tokens} tokens"),
        (
            "rollout peak",
            rollout_peak,
            "weights" + (" gathered" if shards > 1 else "") + " + optimizer + KV",
        ),
    ]
    plan = Plan(table, train_peak, rollout_peak, gpu_memory_gb * GIB)
    rollout_tokens = {
        "validation": (val_rows, data.max_prompt_length + validation.max_new_tokens),
        "training": (train_gen_rows, data.max_prompt_length + response),
    }
    footprint = Footprint(
        gpus, shards, compute_bytes, weights, optimizer, reference, rollout_tokens
    )
    count_what_runs(plan, cfg, shape, footprint)
    return plan


# ---- what runs beside the step: the engine, FSDP's root unit, autocast, host, disk ----------
ADAMW_STATES = 2
# vLLM's defaults (engine/arg_utils.py of 0.33.0, the LLM class): GPUs of >= 70 GiB (H100,
# H200) / smaller ones.
VLLM_DEFAULTS = {True: (16384, 1024), False: (8192, 256)}  # max_num_batched_tokens, max_num_seqs
# What vLLM measures at start and the planner cannot: CUDA graphs, NCCL and allocator overhead.
VLLM_ALLOWANCE_GIB = 2.0


@dataclass(frozen=True)
class Footprint:
    """Per-GPU bytes of the training side that `estimate` counted, and how it is sharded."""

    gpus: int
    shards: int
    compute_bytes: int
    weights: float  # fp32 master shard
    optimizer: float
    reference: float
    rollout_tokens: dict[str, tuple[int, int]]  # phase -> (rows per rank, tokens per row)


def uses_vllm(cfg: DictConfig) -> bool:
    engine = cfg.get("engine") or {}
    return str(engine.get("_target_", "")).endswith("VLLMEngine")


def rank0_loads(cfg: DictConfig) -> bool:
    strategy = cfg.hardware.get("strategy")
    return isinstance(strategy, DictConfig) and bool(strategy.get("rank0_loads"))


def autocast(cfg: DictConfig, footprint: Footprint) -> bool:
    """hardware=gpu|ddp with a low-precision model.dtype: bf16 autocast over fp32 weights."""
    accelerator = cfg.hardware.get("accelerator")
    return footprint.shards == 1 and accelerator != "cpu" and footprint.compute_bytes < FP32


def count_what_runs(plan: Plan, cfg: DictConfig, shape: Shape, footprint: Footprint) -> None:
    """Add FSDP's root unit, autocast's weight copies, the vLLM engine, host memory at load and
    checkpoint sizes to `plan` (its peaks and rows)."""
    params, compute = shape.params(), footprint.compute_bytes
    if footprint.shards > 1:
        root = shape.params() - shape.num_hidden_layers * shape.layer_params()
        # The root is not resharded after forward: its weights and gradient stay unsharded in
        # the compute dtype through forward and backward.
        root_bytes = root * 2 * compute
        how = f"{root / 1e9:.2f} B (embeddings, head, norm): weights + grads unsharded"
        plan.rows.insert(2, ("FSDP root unit", root_bytes, how))
        plan.train_peak += root_bytes
    vllm = uses_vllm(cfg)
    if autocast(cfg, footprint):
        copies = params * compute  # autocast caches each weight's cast for the whole forward
        how = "every weight cast to the compute dtype, cached for the forward"
        plan.rows.insert(2, ("autocast weight copies", copies, how))
        plan.train_peak += copies
        if not vllm:
            plan.rollout_peak += copies
    if vllm:
        count_vllm(plan, cfg, shape, footprint)
    set_row(plan, "training step peak", plan.train_peak)
    set_row(plan, "rollout peak", plan.rollout_peak)
    count_host_and_disk(plan, cfg, shape, footprint)


def set_row(plan: Plan, what: str, value: float) -> None:
    """Update the value of the row named `what`."""
    for index, (name, _, note) in enumerate(plan.rows):
        if name == what:
            plan.rows[index] = (name, value, note)


def count_vllm(plan: Plan, cfg: DictConfig, shape: Shape, footprint: Footprint) -> None:
    """engine=vllm: the rollout is vLLM's budget (gpu_memory_utilization x the GPU) beside the
    training state; its KV cache in tokens against what the rollout holds at once."""
    engine, compute = cfg.engine, footprint.compute_bytes
    budget = float(engine.get("gpu_memory_utilization", 0.92)) * plan.gpu_bytes
    default_tokens, default_seqs = VLLM_DEFAULTS[plan.gpu_bytes >= 70 * GIB]
    batched = int(engine.get("max_num_batched_tokens") or default_tokens)
    seqs = int(engine.get("max_num_seqs") or default_seqs)
    weights = shape.params() * compute
    d, ff = shape.hidden_size, shape.intermediate_size
    # vLLM's profile run: one layer's working set at max_num_batched_tokens (q, k, v, attention
    # output, residual; gate/up and their product) and the sampler's fp32 logits and probs.
    forward = batched * (4 * d + 3 * ff) * compute + seqs * shape.vocab_size * 2 * FP32
    allowance = VLLM_ALLOWANCE_GIB * GIB
    kv_bytes = budget - weights - forward - allowance
    per_token = 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim * compute
    capacity = max(kv_bytes, 0) / per_token
    needs = footprint.rollout_tokens.items()
    phase, (rows, length) = max(needs, key=lambda item: item[1][0] * item[1][1])
    concurrent = min(rows, seqs)
    need = concurrent * length
    level = int(engine.get("sleep_level", 1))
    # The weight sync gathers one full fp32 tensor at a time and casts it to vLLM's dtype.
    largest = shape.vocab_size * shape.hidden_size * (FP32 + compute)
    resident = footprint.weights + footprint.optimizer + footprint.reference
    # vLLM replaces the HF-generate rollout the table counted: no gathered policy, no HF KV.
    plan.rows = [row for row in plan.rows if row[0] not in ("rollout KV cache", "rollout peak")]
    plan.rows += [
        ("vLLM budget", budget, f"gpu_memory_utilization x {plan.gpu_bytes / GIB:.0f} GiB"),
        ("  its weights", weights, f"{shape.params() / 1e9:.2f} B in the compute dtype"),
        ("  its forward peak", forward, f"{batched} batched tokens, {seqs} sequences"),
        ("  CUDA graphs etc. (allowance)", allowance, "vLLM measures it at start"),
        (
            "  its KV cache",
            max(kv_bytes, 0),
            f"{capacity / 1e3:.0f}k tokens ({per_token / 1024:.0f} KiB each)",
        ),  # fmt: skip
        (
            "rollout KV need",
            need * per_token,
            f"{phase}: {concurrent} rows at once x {length} "
            "tokens (worst case: every row to its limit)",
        ),  # fmt: skip
        ("weight sync", largest, "largest tensor gathered in fp32 + its cast"),
        ("vLLM asleep (GPU)", budget if level == 0 else 0.0, f"sleep_level {level}"),
        ("rollout peak", 0.0, "training shard + optimizer + vLLM budget + weight sync"),
    ]
    plan.rollout_peak = resident + budget + largest
    if level == 0:  # vLLM stays resident through the training step
        plan.train_peak += budget
    if kv_bytes <= 0:
        plan.warnings.append(
            f"engine=vllm: gpu_memory_utilization leaves no KV cache ({budget / GIB:.1f} GiB "
            f"for {weights / GIB:.1f} GiB of weights and {forward / GIB:.1f} GiB of forward "
            "peak): raise engine.gpu_memory_utilization or lower engine.max_num_batched_tokens"
        )
    elif need > capacity:
        fit = int(capacity // length)
        plan.warnings.append(
            f"engine=vllm: the {phase} rollout holds up to {need / 1e3:.0f}k tokens of KV "
            f"({concurrent} rows x {length}) but vLLM's cache holds {capacity / 1e3:.0f}k: it "
            f"will preempt and recompute rows. Set engine.max_num_seqs={fit} (rows run in "
            "waves) or raise engine.gpu_memory_utilization"
        )


def count_host_and_disk(plan: Plan, cfg: DictConfig, shape: Shape, footprint: Footprint) -> None:
    """Host memory at load (fp32 weights built on CPU before sharding, on every rank or on
    rank 0 only), vLLM's pinned backup at sleep level 1, and checkpoint sizes on disk."""
    params = shape.params()
    devices = int(cfg.hardware.get("devices", 1))  # per node; -1: all of one node's GPUs
    per_node = min(footprint.gpus, devices) if devices > 0 else footprint.gpus
    full = params * FP32
    node_load = full if rank0_loads(cfg) else full * per_node
    loads = "rank 0 only (hardware.strategy.rank0_loads)" if rank0_loads(cfg) else "every rank"
    plan.host_rows += [
        ("host at load, per loading rank", full, f"{params / 1e9:.2f} B x 4 B (fp32) on CPU"),
        (f"host at load, per node ({per_node} ranks)", node_load, f"loaded on {loads}"),
    ]
    if uses_vllm(cfg) and int(cfg.engine.get("sleep_level", 1)) == 1:
        backup = params * footprint.compute_bytes * per_node
        plan.host_rows.append(
            ("vLLM sleep level 1, per node", backup, "weights backed up in pinned host memory")
        )
    state = params * FP32 * (1 + ADAMW_STATES)
    plan.host_rows += [
        ("checkpoint on disk, full", state, "fp32 weights + AdamW's 2 states (resume)"),
        ("checkpoint on disk, weights only", full, "fp32 weights (best; export: half in bf16)"),
    ]


def print_plan(plan: Plan, title: str, measured: float | None = None) -> None:
    table = Table(title=title)
    for column in ("per GPU", "GiB", "counted as"):
        table.add_column(column)
    for what, value, how in plan.rows:
        table.add_row(what, f"{value / GIB:.2f}", how)
    verdict = "fits" if plan.fits else "does NOT fit"
    table.add_row("peak", f"{plan.peak / GIB:.2f}", f"{verdict} in {plan.gpu_bytes / GIB:.0f} GiB")
    if measured is not None:
        table.add_row(
            "measured step peak (this CPU)",
            f"{measured / GIB:.3f}",
            f"estimate / measured = {plan.train_peak / measured:.2f}",
        )
    if plan.host_rows:
        table.add_section()
        for what, value, how in plan.host_rows:
            table.add_row(what, f"{value / GIB:.2f}", how)
    Console(width=120).print(table)
    for warning in plan.warnings:
        print("WARNING:", warning)


def rss_bytes(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) * 1024


def plain_gradient_step(
    module, optimizer: torch.optim.Optimizer, minibatch: TokenBatch, micro_loss: MicroLoss
) -> dict[str, Tensor]:
    """One optimiser step of `module` without a Trainer: its micro-batches' loss -> backward
    (`backpropagate`, as `gradient_step` runs them), then clip and step `optimizer`."""
    micro_batches = module.micro_batches(minibatch)
    totals = backpropagate(micro_batches, micro_loss, Tensor.backward, 0)
    if module.recipe.grad_clip:
        torch.nn.utils.clip_grad_norm_(module.parameters(), module.recipe.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


def measured_step_peak(cfg: DictConfig) -> float:
    """Bytes of one real training step of `cfg` on CPU, on synthetic rows of the longest length:
    the weights built (counted exactly) + the peak RSS of the step above the RSS before it (after
    a warm-up step, so AdamW's state counts too; imports and the tokenizer do not)."""
    from osftkit.train import build_components

    torch.set_num_threads(1)
    # Freed tensors go straight back to the OS (glibc would otherwise raise its mmap threshold
    # and keep them in the heap), so RSS follows the live tensors, as a GPU's allocated bytes do.
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    _, _, module = build_components(cfg)
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    weights += sum(b.numel() * b.element_size() for b in module.buffers())
    method, data = cfg.method, cfg.data
    recipe = OmegaConf.to_object(method)
    rollout = isinstance(recipe, RolloutRecipe)
    response = method.max_new_tokens if rollout else data.max_response_length
    rows = data.batch_size // int(cfg.hardware.get("devices", 1))
    if rollout:
        rows = rows * method.group_size // method.get("num_minibatches", 1)
    width = data.max_prompt_length + response
    vocab = module.model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (rows, width), generator=torch.Generator().manual_seed(0))
    score = torch.zeros_like(ids, dtype=torch.bool)
    score[:, data.max_prompt_length :] = True
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = module.optimizer_factory(params=trainable)
    loss_fn = module.minibatch_loss if rollout else module.nll_loss
    per_row = {"advantages": torch.ones(rows)} if isinstance(recipe, GRPORecipe) else {}

    def one_step() -> None:
        batch = TokenBatch(ids, torch.ones_like(ids), score[:, 1:], dict(per_row))
        minibatch = weighted(batch, method.get("loss_aggregation", "token-mean"), response)
        plain_gradient_step(module, optimizer, minibatch, loss_fn)

    before_warm_up = rss_bytes("VmRSS")
    one_step()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    one_step()
    return float(weights + rss_bytes("VmHWM") - before_warm_up)


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """train.py overrides, and the plan.* knobs."""
    overrides, knobs = [], {}
    for arg in argv:
        if arg.startswith("plan."):
            key, _, value = arg[len("plan.") :].partition("=")
            if key not in PLAN_KNOBS:
                raise ValueError(f"unknown planner knob plan.{key}; known: {PLAN_KNOBS}")
            knobs[key] = value
        else:
            overrides.append(arg)
    return overrides, knobs


def main(argv: list[str] | None = None) -> Plan:
    from osftkit.train import compose_train_config

    overrides, knobs = split_overrides(sys.argv[1:] if argv is None else argv)
    cfg = compose_train_config(overrides)
    plan = estimate(
        cfg,
        gpu_memory_gb=float(knobs.get("gpu_memory_gb", 80)),
        num_gpus=int(knobs["num_gpus"]) if "num_gpus" in knobs else None,
        model_config=knobs.get("model_config"),
    )
    measured = None
    if knobs.get("measure", "false").lower() == "true":
        start = time.perf_counter()
        measured = measured_step_peak(cfg)
        print(f"measured one step in {time.perf_counter() - start:.1f} s")
    print_plan(plan, "memory plan: python -m osftkit.plan " + " ".join(overrides), measured)
    print(
        json.dumps(
            {
                "estimate_train_peak_bytes": plan.train_peak,
                "measured_train_peak_bytes": measured,
                "fits": plan.fits,
                "warnings": plan.warnings,
            }
        )
    )
    return plan


if __name__ == "__main__":
    from hydra.errors import HydraException

    try:
        main()
    except (ValueError, FileNotFoundError, HydraException) as error:  # a user's mistake: one line
        sys.exit(f"{type(error).__name__}: {error}")
