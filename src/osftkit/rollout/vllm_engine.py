"""A vLLM generation engine for GPU users (`pip install -e ".[gpu]"`, engine=vllm).

GPU only, and not exercised by the CPU test suite beyond the conversion of vLLM's outputs:
the policy's current weights are copied into the co-located vLLM model before every
generation, i.e. after each optimiser step.
"""

from typing import Any

import torch
from torch import Tensor, nn

from osftkit.rollout.engine import Rollouts, check_generation_args, group_rollouts


class VLLMEngine:
    """Same interface as HFGenerateEngine; `llm_kwargs` go to `vllm.LLM` (e.g. memory fraction)."""

    def __init__(self, **llm_kwargs: Any) -> None:
        self.llm_kwargs = {"gpu_memory_utilization": 0.3, "enable_sleep_mode": False, **llm_kwargs}
        self.llm = None

    def _engine(self, model: nn.Module):
        if self.llm is None:
            try:
                from vllm import LLM
            except ImportError as error:
                raise ImportError(
                    'engine=vllm needs vLLM and a GPU: pip install -e ".[gpu]"'
                ) from error
            self.llm = LLM(model=model.config._name_or_path, **self.llm_kwargs)
        return self.llm

    def sync_weights(self, model: nn.Module) -> None:
        """Load the policy's current weights into vLLM's copy of the model."""
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.model.load_weights(model.state_dict().items())

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
    ) -> Rollouts:
        from vllm import SamplingParams

        check_generation_args(num_samples, temperature, top_p, max_new_tokens)
        llm = self._engine(model)
        self.sync_weights(model)
        prompts = [
            {"prompt_token_ids": ids[mask.bool()].tolist()}
            for ids, mask in zip(prompt_ids, prompt_mask, strict=True)
        ]
        params = SamplingParams(
            n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens
        )
        outputs = llm.generate(prompts, params, use_tqdm=False)
        responses = [list(o.token_ids) for request in outputs for o in request.outputs]
        return rollouts_from_token_lists(
            responses, prompt_ids, prompt_mask, num_samples, eos_token_id, pad_token_id
        )


def rollouts_from_token_lists(
    responses: list[list[int]],
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    num_samples: int,
    eos_token_id: int,
    pad_token_id: int,
) -> Rollouts:
    """Right-pad prompt-major response token lists into Rollouts."""
    width = max(1, max(len(r) for r in responses))
    response_ids = torch.full((len(responses), width), pad_token_id, dtype=torch.long)
    for row, tokens in enumerate(responses):
        response_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in responses])
    device = prompt_ids.device
    return group_rollouts(
        prompt_ids,
        prompt_mask,
        response_ids.to(device),
        num_samples,
        eos_token_id,
        lengths.to(device),
    )
