"""vLLM rollouts colocated with training (`pip install -e ".[gpu]"`, engine=vllm, GPU only).

Written against vLLM 0.33.0 (the V1 engine; `scripts/check_vllm_api.py` checks every name used
here against that release's source). The design follows TRL's colocate mode: one in-process
`LLM` per rank with the `external_launcher` executor (each rank generates its own prompts on
its own GPU), sleep mode so the engine holds no GPU memory while the policy trains, and before
a batch: wake the weights, stream the policy's weights into vLLM one parameter at a time (only
when they changed since the last sync, i.e. once per optimiser step), reset the prefix cache,
wake the KV cache, generate, sleep.
"""

import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from packaging.version import Version
from torch import Tensor, nn

from osftkit.rollout.engine import Rollouts, check_generation_args, rollouts_from_token_lists
from osftkit.rollout.weight_sync import stream_weights, weights_version

VLLM_PIN = "0.33.0"
WORKER_EXTENSION = "osftkit.rollout.vllm_worker.WeightSyncExtension"
LOAD_METHOD = "osftkit_load_weights"
# LLM arguments the engine sets itself (rank-aware setup, sleep mode, weight sync).
ENGINE_SET = (
    "model",
    "distributed_executor_backend",
    "worker_extension_cls",
    "enable_sleep_mode",
    "skip_tokenizer_init",
    "seed",
    "tensor_parallel_size",
)
NO_VLLM = (
    f'engine=vllm needs vLLM {VLLM_PIN} and a GPU: pip install -e ".[gpu]" and run with '
    "hardware=gpu (or a multi-GPU hardware option); on CPU use engine=hf"
)


def load_vllm() -> Any:
    """The vllm module, at least the pinned release."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(NO_VLLM) from error
    if Version(vllm.__version__) < Version(VLLM_PIN):
        raise ImportError(
            f"engine=vllm was written against vLLM {VLLM_PIN}; found {vllm.__version__} "
            f'(its V0 internals differ): pip install -e ".[gpu]"'
        )
    return vllm


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
    weights even if unchanged); 0 keeps vLLM resident. `llm_kwargs` go to `vllm.LLM`
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
        if not torch.cuda.is_available():
            raise RuntimeError(f"{NO_VLLM} (no CUDA device is visible)")
        self.sleep_level = sleep_level
        self.llm_kwargs = llm_kwargs
        self.llm = None
        self.dtype: torch.dtype | None = None
        self.synced_version: tuple | None = None
        self.syncs = 0  # weight syncs so far (one per optimiser step between rollouts)

    def build(self, model: nn.Module) -> None:
        """One LLM on this rank's GPU, from the policy's config; asleep until the first batch."""
        path = model.config._name_or_path
        if not path:
            raise ValueError("engine=vllm needs model.config._name_or_path (a saved model dir)")
        os.environ.update(rank_environment())
        self.llm = self.vllm.LLM(
            model=path,
            distributed_executor_backend="external_launcher",
            worker_extension_cls=WORKER_EXTENSION,
            enable_sleep_mode=self.sleep_level > 0,
            skip_tokenizer_init=True,  # the kit passes token ids and decodes itself
            seed=(torch.initial_seed() + int(os.environ["RANK"])) % 2**31,
            tensor_parallel_size=1,
            **self.llm_kwargs,
        )
        self.dtype = self.llm.llm_engine.model_config.dtype
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)

    def sync_weights(self, model: nn.Module) -> bool:
        """Stream the policy into vLLM if it changed since the last sync; then reset the
        prefix cache (it holds KV computed with the old weights). Returns whether it synced."""
        version = weights_version(model)
        if version == self.synced_version:
            return False
        for name, tensor in stream_weights(model, self.dtype):
            self.llm.collective_rpc(LOAD_METHOD, args=([(name, tensor)],))
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
        eos_token_id: int,
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
        params = self.vllm.SamplingParams(
            n=1 if greedy else num_samples,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            stop_token_ids=[eos_token_id],
            detokenize=False,
        )
        outputs = self.run(model, self.prompts(prompt_ids, prompt_mask, prompt_embeds), params)
        responses = [
            list(o.token_ids)
            for request in outputs
            for o in sorted(request.outputs, key=lambda o: o.index)
            for _ in range(num_samples if greedy else 1)
        ]
        return rollouts_from_token_lists(
            responses, prompt_ids, prompt_mask, num_samples, eos_token_id, pad_token_id
        )

    def run(self, model: nn.Module, prompts: list[dict], params: Any) -> list:
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
