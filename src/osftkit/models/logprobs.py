"""The one log-prob path of every causal-LM method: log p(chosen token) of the scored positions.

The decoder body runs once; the LM head runs only on the positions whose next token is scored,
`chunk_size` positions at a time, so no (batch, tokens, vocab) tensor is ever built. Under
autograd each chunk is checkpointed: backward recomputes that chunk's logits instead of keeping
the logits of every position alive until the backward pass.
"""

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 256


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip padding, so left- and right-padded rows see the same positions."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def check_logprob_args(temperature: float, chunk_size: int) -> None:
    if temperature <= 0:
        raise ValueError(f"training temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"logprob_chunk_size must be >= 1, got {chunk_size}")


def _chunk_scores(
    hidden: Tensor,
    head: nn.Module,
    targets: Tensor,
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """log p(target) and entropy (without grad unless `entropy_grad`) of one chunk of
    positions (M, D) -> (M,), (M,)."""
    logits = head(hidden).float()
    if temperature != 1.0:
        # In place: the head's matmul keeps its inputs, not this output.
        logits = logits.div_(temperature)
    normaliser = logits.logsumexp(dim=-1)
    chosen = logits.gather(-1, targets[:, None]).squeeze(-1) - normaliser
    if not with_entropy:
        return chosen, chosen.new_zeros(())
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        # H = log Z - sum p * logits: one (M, V) temporary (p), no product tensor.
        probs = (logits - normaliser[:, None]).exp_()  # in place: autograd keeps the result
        entropy = normaliser - torch.linalg.vecdot(probs, logits)
    return chosen, entropy


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder body and the LM head of an HF causal LM (PEFT wrappers forward both)."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"{type(model).__name__} has no decoder body / output embeddings")
    return decoder, head


def hidden_at(
    model: nn.Module,
    attention_mask: Tensor,
    positions: Tensor,
    input_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
) -> Tensor:
    """Final hidden states (M, D) at the (N, T) boolean `positions`, row-major: the decoder body
    runs once, the LM head not at all."""
    inputs = {
        "input_ids": input_ids,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "use_cache": False,
    }
    decoder, _ = decoder_and_head(model)
    if not isinstance(model, FSDPModule):
        return decoder(**inputs).last_hidden_state[positions]
    # FSDP2 gathers the root unit's weights (embeddings, final norm, head) in the root's forward
    # and reduces their gradients after its backward: run the whole model, with no logits kept,
    # and take the decoder's output. The root stays gathered after its forward, so the head can
    # then be applied chunk by chunk.
    captured: list[Tensor] = []
    hook = decoder.register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state))
    try:
        no_logits = torch.empty(0, dtype=torch.long, device=attention_mask.device)
        model(**inputs, logits_to_keep=no_logits)
    finally:
        hook.remove()
    return captured[0][positions]


def next_token_distribution(
    model: nn.Module,
    attention_mask: Tensor,
    positions: Tensor,
    input_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
) -> Tensor:
    """(M, V) log p(next token) at the (N, T) boolean `positions` (one per row or a few: the
    full distribution of every position would be the (N, T, V) tensor this module avoids)."""
    _, head = decoder_and_head(model)
    hidden = hidden_at(model, attention_mask, positions, input_ids, inputs_embeds)
    return head(hidden).float().log_softmax(dim=-1)


def next_token_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(N, V) log p(next token) after the last column of left-padded rows."""
    last = torch.zeros_like(input_ids, dtype=torch.bool)
    last[:, -1] = True
    return next_token_distribution(model, attention_mask, last, input_ids)


def token_logprobs(
    model: nn.Module,
    *,
    attention_mask: Tensor,
    score_mask: Tensor,
    input_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    targets: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = True,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log p(x_{t+1} | x_<=t) at temperature `temperature` where `score_mask` (N, T - 1) is set.

    Returns dense (N, T - 1) log-probs and entropies (entropy without grad unless
    `entropy_grad`, for a loss on it as EM-FT's; None when `with_entropy` is off), zero at
    positions that are not scored. Give `input_ids` (N, T), or
    `inputs_embeds` (N, T, D) with `targets` (N, T) holding the token ids to score.
    """
    check_logprob_args(temperature, chunk_size)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("token_logprobs needs exactly one of input_ids and inputs_embeds")
    targets = input_ids if targets is None else targets
    if targets is None:
        raise ValueError("token_logprobs with inputs_embeds needs the target token ids")
    score_mask = score_mask.bool()
    _, head = decoder_and_head(model)
    # Position t scores token t + 1: the last position scores nothing.
    positions = torch.cat([score_mask, torch.zeros_like(score_mask[:, :1])], dim=1)
    hidden = hidden_at(model, attention_mask, positions, input_ids, inputs_embeds)
    chosen_ids = targets[:, 1:][score_mask]
    train = torch.is_grad_enabled() and hidden.requires_grad
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start : start + chunk_size], head, chosen_ids[start : start + chunk_size])
        if train:
            parts.append(
                checkpoint(
                    _chunk_scores,
                    *args,
                    temperature,
                    with_entropy,
                    entropy_grad,
                    use_reentrant=False,
                )
            )
        else:
            parts.append(_chunk_scores(*args, temperature, with_entropy, entropy_grad))
    dense = torch.zeros(score_mask.shape, dtype=torch.float32, device=score_mask.device)
    if not parts:
        return dense + hidden.sum() * 0, dense if with_entropy else None
    logp = dense.masked_scatter(score_mask, torch.cat([p[0] for p in parts]))
    if not with_entropy:
        return logp, None
    return logp, dense.masked_scatter(score_mask, torch.cat([p[1] for p in parts]))
