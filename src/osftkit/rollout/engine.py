"""Generation engines and the Rollouts they return (prompt-major: G rows per prompt)."""

from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch
from jinja2 import TemplateError
from torch import Tensor, nn


@dataclass
class Rollouts:
    """G responses per prompt. Row r belongs to prompt r // group_size.

    `response_mask` covers the response up to and including its first stop token (EOS or an
    end-of-turn token); a response with none ran into `max_new_tokens` and is marked `truncated`.
    `logprobs`, when the engine reports them, are its log-probs of the sampled response tokens
    at the sampling temperature (zero past the mask), for the rollout/trainer agreement guard.
    """

    prompt_ids: Tensor  # (N, P) left padded
    prompt_mask: Tensor  # (N, P)
    response_ids: Tensor  # (N, R) right padded
    response_mask: Tensor  # (N, R)
    truncated: Tensor  # (N,) bool
    group_size: int
    logprobs: Tensor | None = None  # (N, R)

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
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "group_size"}
        return replace(self, **{name: t[index] for name, t in tensors.items() if t is not None})


def stop_ids(eos_token_id: int | list[int]) -> list[int]:
    """The token ids that end a response: one EOS, or every end-of-turn id."""
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def response_mask_and_truncation(
    response_ids: Tensor, eos_token_id: int | list[int]
) -> tuple[Tensor, Tensor]:
    """1 up to and including the first stop token; rows without one are truncated (mask all
    ones)."""
    stops = torch.tensor(stop_ids(eos_token_id), device=response_ids.device)
    is_eos = torch.isin(response_ids, stops)
    truncated = ~is_eos.any(dim=1)
    # eos_seen counts EOS tokens strictly before each position; keep positions with none seen.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long(), truncated


class GenerationEngine(Protocol):
    """What the rollout hook needs: G samples per prompt from the model as it is now.

    With `prompt_embeds` (N, P, H) the model reads these embeddings instead of embedding
    `prompt_ids` (a learned soft prompt, SANDE's parrot); `prompt_ids` (N, P) then only fill the
    Rollouts (pad where a position holds no token) and `prompt_mask` marks the attended slots.

    `decodes_with_policy`: the engine runs the policy module itself, so a sharded policy must be
    gathered around the call (an engine with its own copy of the weights streams them instead).
    """

    decodes_with_policy: bool

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
    ) -> Rollouts: ...


class HFGenerateEngine:
    """transformers `generate` with a KV cache; temperature 0 means greedy decoding.

    `generate` stops as soon as every row of a batch has produced EOS. With `max_batch_tokens`
    the prompts go in chunks whose padded (prompt + max_new_tokens) x G rows fit that many
    tokens, so a large rollout never holds one KV cache for all of its rows at once. With
    `report_logprobs` a sampled rollout carries the log-probs of its tokens under the processed
    scores (temperature and top-p applied), at the cost of keeping every step's scores.
    """

    decodes_with_policy = True

    def __init__(self, max_batch_tokens: int | None = None, report_logprobs: bool = False) -> None:
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(
                f"engine.max_batch_tokens must be >= 1 or null, got {max_batch_tokens}"
            )
        self.max_batch_tokens = max_batch_tokens
        self.report_logprobs = report_logprobs

    def prompts_per_chunk(self, num_prompts: int, row_tokens: int, num_samples: int) -> int:
        """How many prompts one `generate` call takes (at least one)."""
        if self.max_batch_tokens is None:
            return num_prompts
        return max(1, self.max_batch_tokens // (row_tokens * num_samples))

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
        greedy = temperature == 0
        copies = 1 if greedy else num_samples
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
        settings = {
            "max_new_tokens": max_new_tokens,
            "num_return_sequences": copies,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "use_cache": True,
            **({"do_sample": False} if greedy else sampling),
        }
        report = self.report_logprobs and not greedy
        if report:
            settings |= {"output_scores": True, "return_dict_in_generate": True}
        step = self.prompts_per_chunk(
            prompt_ids.shape[0], prompt_ids.shape[1] + max_new_tokens, copies
        )
        was_training = model.training
        model.eval()
        try:
            chunks = [
                generate_chunk(
                    model,
                    prompt_ids[start : start + step],
                    prompt_mask[start : start + step],
                    None if prompt_embeds is None else prompt_embeds[start : start + step],
                    settings,
                )
                for start in range(0, prompt_ids.shape[0], step)
            ]
        finally:
            model.train(was_training)
        response_ids = pad_right([tokens for tokens, _ in chunks], pad_token_id)
        if greedy:  # every greedy sample is the same: decode once, repeat
            response_ids = response_ids.repeat_interleave(num_samples, dim=0)
        rollouts = group_rollouts(prompt_ids, prompt_mask, response_ids, num_samples, eos_token_id)
        if report:
            rollouts.logprobs = pad_right([logp for _, logp in chunks], 0.0)
        return rollouts


def generate_chunk(
    model: nn.Module, ids: Tensor, mask: Tensor, embeds: Tensor | None, settings: dict
) -> tuple[Tensor, Tensor | None]:
    """The new tokens of one `generate` call (from token ids, or from embeddings) and, when
    the settings ask for scores, the log-probs of those tokens under the processed scores."""
    if embeds is None:
        output = model.generate(input_ids=ids, attention_mask=mask, **settings)
    else:
        output = model.generate(inputs_embeds=embeds, attention_mask=mask, **settings)
    sequences = output.sequences if settings.get("return_dict_in_generate") else output
    # From embeddings alone, decoder-only `generate` returns only the new tokens.
    tokens = sequences if embeds is not None else sequences[:, ids.shape[1] :]
    if not settings.get("output_scores"):
        return tokens, None
    scores = torch.stack(output.scores, dim=1).float().log_softmax(dim=-1)  # (rows, R, V)
    return tokens, scores.gather(2, tokens[:, :, None]).squeeze(2)


def pad_right(chunks: list[Tensor], pad_token_id: float) -> Tensor:
    """Concatenate (rows, width) chunks of different widths, right-padded with pad."""
    width = max(chunk.shape[1] for chunk in chunks)
    return torch.cat(
        [nn.functional.pad(c, (0, width - c.shape[1]), value=pad_token_id) for c in chunks]
    )


def group_rollouts(
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    response_ids: Tensor,
    num_samples: int,
    eos_token_id: int | list[int],
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


def rollouts_from_token_lists(
    responses: list[list[int]],
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    num_samples: int,
    eos_token_id: int | list[int],
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


def check_generation_args(num_samples: int, temperature: float, top_p: float, max_new_tokens: int):
    if num_samples < 1:
        raise ValueError(f"the number of samples per prompt (G) must be >= 1, got {num_samples}")
    if temperature < 0:
        raise ValueError(f"temperature must be > 0 (or 0 for greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def end_of_turn_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token that ends a reply: the tokenizer's EOS, the model's generation_config EOS
    list, and the token the chat template closes an assistant turn with (Qwen2.5 base models:
    EOS `<|endoftext|>`, turn end `<|im_end|>`)."""
    configured = getattr(generation_config, "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *stop_ids(configured if configured is not None else [])]
    ids += template_end_of_turn(tokenizer)
    return list(dict.fromkeys(i for i in ids if i is not None))  # EOS first, no repeats


def template_end_of_turn(tokenizer) -> list[int]:
    """The special token right after an assistant reply in the chat template, if any."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    reply = "osftkit-reply"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except TemplateError:  # a template that takes no plain user/assistant turn: EOS only
        return []
    after = tokenizer(text.split(reply, 1)[-1], add_special_tokens=False)["input_ids"][:1]
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return [after[0]] if after and after[0] in special else []
