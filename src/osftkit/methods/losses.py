"""Token log-probabilities and masked aggregation shared by the LM methods."""

import torch.nn.functional as F
from torch import Tensor, nn

AGGREGATIONS = ("token_mean", "sequence_mean")


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip padding, so left- and right-padded rows see the same positions."""
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)


def next_token_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """log p(x_{t+1} | x_<=t) with logits divided by `temperature`, and the entropy at each t.

    Both have shape (N, T - 1): position t scores token t + 1.
    """
    if temperature <= 0:
        raise ValueError(f"training temperature must be > 0, got {temperature}")
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits[:, :-1]
    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
    chosen = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return chosen, entropy.detach()


def masked_mean(values: Tensor, mask: Tensor, aggregation: str = "token_mean") -> Tensor:
    """Mean over masked tokens: of all tokens together, or per sequence then over sequences."""
    mask = mask.to(values.dtype)
    if aggregation == "token_mean":
        return (values * mask).sum() / mask.sum().clamp(min=1)
    if aggregation == "sequence_mean":
        per_sequence = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_sequence.mean()
    raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got '{aggregation}'")
