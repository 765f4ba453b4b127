"""Generation engines and the Rollouts they return (prompt-major: G rows per prompt)."""

from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch
from torch import Tensor, nn


@dataclass
class Rollouts:
    """G responses per prompt. Row r belongs to prompt r // group_size.

    `response_mask` covers the response up to and including its first EOS; a response with no
    EOS ran into `max_new_tokens` and is marked `truncated`.
    """

    prompt_ids: Tensor  # (N, P) left padded
    prompt_mask: Tensor  # (N, P)
    response_ids: Tensor  # (N, R) right padded
    response_mask: Tensor  # (N, R)
    truncated: Tensor  # (N,) bool
    group_size: int

    @property
    def lengths(self) -> Tensor:
        return self.response_mask.sum(dim=1)

    @property
    def sequences(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def loss_mask(self) -> Tensor:
        """Mask over next-token positions (length P + R - 1) that predict response tokens."""
        return torch.cat([torch.zeros_like(self.prompt_mask), self.response_mask], dim=1)[:, 1:]

    def split(self, num_chunks: int) -> list["Rollouts"]:
        """Split into `num_chunks` mini-batches of whole groups, in order."""
        num_prompts = self.prompt_ids.shape[0] // self.group_size
        if not 1 <= num_chunks <= num_prompts:
            raise ValueError(f"cannot split {num_prompts} prompts into {num_chunks} mini-batches")
        bounds = torch.linspace(0, num_prompts, num_chunks + 1).round().long() * self.group_size
        return [
            self.rows(slice(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    def rows(self, index: slice | Tensor) -> "Rollouts":
        tensor_fields = [f.name for f in fields(self) if f.name != "group_size"]
        return replace(self, **{name: getattr(self, name)[index] for name in tensor_fields})


def response_mask_and_truncation(response_ids: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """1 up to and including the first EOS; rows without an EOS are truncated (mask all ones)."""
    is_eos = response_ids == eos_token_id
    truncated = ~is_eos.any(dim=1)
    # eos_seen counts EOS tokens strictly before each position; keep positions with none seen.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long(), truncated


class GenerationEngine(Protocol):
    """What the rollout hook needs: G samples per prompt from the model as it is now."""

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
    ) -> Rollouts: ...


class HFGenerateEngine:
    """transformers `generate` with a KV cache; temperature 0 means greedy decoding."""

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
        check_generation_args(num_samples, temperature, top_p, max_new_tokens)
        was_training = model.training
        model.eval()
        greedy = temperature == 0
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
        try:
            output = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                max_new_tokens=max_new_tokens,
                num_return_sequences=1 if greedy else num_samples,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                use_cache=True,
                **({"do_sample": False} if greedy else sampling),
            )
        finally:
            model.train(was_training)
        response_ids = output[:, prompt_ids.shape[1] :]
        if greedy:  # every greedy sample is the same: decode once, repeat
            response_ids = response_ids.repeat_interleave(num_samples, dim=0)
        return group_rollouts(prompt_ids, prompt_mask, response_ids, num_samples, eos_token_id)


def group_rollouts(
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    response_ids: Tensor,
    num_samples: int,
    eos_token_id: int,
    lengths: Tensor | None = None,
) -> Rollouts:
    """Rollouts from prompt-major (N * G, R) responses; `lengths`, when the engine knows them,
    also masks the padding after a response that stopped without EOS."""
    response_mask, truncated = response_mask_and_truncation(response_ids, eos_token_id)
    if lengths is not None:
        positions = torch.arange(response_ids.shape[1], device=response_ids.device)
        response_mask = response_mask * (positions < lengths[:, None]).long()
    return Rollouts(
        prompt_ids=prompt_ids.repeat_interleave(num_samples, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(num_samples, dim=0),
        response_ids=response_ids,
        response_mask=response_mask,
        truncated=truncated,
        group_size=num_samples,
    )


def check_generation_args(num_samples: int, temperature: float, top_p: float, max_new_tokens: int):
    if num_samples < 1:
        raise ValueError(f"the number of samples per prompt (G) must be >= 1, got {num_samples}")
    if temperature < 0:
        raise ValueError(f"temperature must be > 0 (or 0 for greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
