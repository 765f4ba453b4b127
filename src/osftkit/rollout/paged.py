"""transformers' continuous batching (`generate_batch`, paged KV cache) as a rollout engine.

Rows that end leave the batch at once and waiting rows take their place, so no decode step is
spent on finished rows (HF `generate` keeps every row of a static batch until the longest ends).
Needs no extra package; runs on CPU and GPU (engine=paged).
"""

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig

from osftkit.rollout.engine import Rollouts, check_generation_args, rollouts_from_token_lists

# transformers' continuous batching logs each manager start and stop at INFO: once per rollout.
logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)


def continuous_batching_config(settings: dict[str, Any]) -> Any:
    """transformers' ContinuousBatchingConfig from engine settings, or a clear error."""
    try:
        from transformers import ContinuousBatchingConfig, GenerationMixin
    except ImportError as error:
        raise ImportError(
            "engine=paged needs transformers' continuous batching (transformers 5.x with "
            "ContinuousBatchingConfig and generate_batch), which this install lacks: use engine=hf"
        ) from error
    if not hasattr(GenerationMixin, "generate_batch"):
        raise ImportError("engine=paged: this transformers has no generate_batch; use engine=hf")
    return ContinuousBatchingConfig(**settings)


class PagedEngine:
    """Same interface and sampling semantics as HFGenerateEngine (temperature 0 = greedy, G
    samples per prompt, EOS, max_new_tokens, top-p without top-k). `continuous_batching` goes to
    transformers' ContinuousBatchingConfig (page_size, num_blocks, max_batch_tokens, ...); with
    its `return_logprobs` a sampled rollout carries the log-probs of its tokens (processed scores).

    Without `num_blocks`, transformers sizes the paged cache from free memory; on CPU that is
    the machine's RAM, a cache so large that every step slows down (34 against 255 tokens/s on
    16 rollouts of the tiny model), so on CPU the cache is sized to the rollout instead: every
    row's prompt and max_new_tokens at once.
    """

    decodes_with_policy = True

    def __init__(self, continuous_batching: dict[str, Any] | None = None) -> None:
        self.settings = dict(continuous_batching or {})
        continuous_batching_config(self.settings)  # unknown keys fail here, at construction

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
        if prompt_embeds is not None:
            raise ValueError(
                "engine=paged cannot generate from prompt embeddings (continuous batching takes "
                "token ids): use engine=hf or engine=vllm"
            )
        greedy = temperature == 0
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            num_return_sequences=1 if greedy else num_samples,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **({"do_sample": False} if greedy else sampling),
        )
        prompts = [
            row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask, strict=True)
        ]
        was_training = model.training
        model.eval()
        try:
            outputs = model.generate_batch(
                prompts,
                generation_config=config,
                continuous_batching_config=self.cache_config(
                    model,
                    len(prompts) * config.num_return_sequences,
                    prompt_ids.shape[1] + max_new_tokens,
                ),
                progress_bar=False,
                warmup=False,  # no CUDA-graph capture: the manager lives for this one call
            )
        finally:
            model.train(was_training)
        expected = len(prompts) * config.num_return_sequences
        failed = [key for key, out in outputs.items() if out.error is not None]
        if len(outputs) != expected or failed:
            raise RuntimeError(
                f"engine=paged returned {len(outputs)} of {expected} responses "
                f"(failed: {failed[:3]}); use engine=hf"
            )
        # generate_batch orders the results prompt-major, a prompt's samples together.
        responses = [out for out in outputs.values() for _ in range(num_samples if greedy else 1)]
        tokens = [list(out.generated_tokens) for out in responses]
        rollouts = rollouts_from_token_lists(
            tokens, prompt_ids, prompt_mask, num_samples, eos_token_id, pad_token_id
        )
        if self.settings.get("return_logprobs") and not greedy:
            rollouts.logprobs = logprob_rows([out.logprobs for out in responses], rollouts)
        return rollouts

    def cache_config(self, model: nn.Module, rows: int, row_tokens: int) -> Any:
        """The ContinuousBatchingConfig of one call (on CPU, a cache that fits the rollout)."""
        settings = dict(self.settings)
        if model.device.type == "cpu" and "num_blocks" not in settings:
            page = settings.get("page_size", continuous_batching_config({}).page_size)
            settings["num_blocks"] = rows * math.ceil(row_tokens / page)
        return continuous_batching_config(settings)


def logprob_rows(logprobs: list[list[float]], rollouts: Rollouts) -> Tensor:
    """(N, R) per-token log-probs, zero past each response's end."""
    out = torch.zeros(rollouts.response_ids.shape, dtype=torch.float32)
    for row, values in enumerate(logprobs):
        out[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return out.to(rollouts.response_ids.device)
