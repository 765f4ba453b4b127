"""Token log-probabilities and masked aggregation shared by the LM methods."""

import torch.nn.functional as F
from torch import Tensor, nn

# verl's names; `token_mean` and `sequence_mean` are the kit's earlier spellings.
AGGREGATIONS = (
    "token_mean",
    "token-mean",
    "sequence_mean",
    "seq-mean-token-sum-norm",
)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip padding, so left- and right-padded rows see the same positions."""
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)


def next_token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    temperature: float = 1.0,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """log p(x_{t+1} | x_<=t) with logits divided by `temperature`, and the entropy at each t
    (detached unless `entropy_grad`: only entropy minimisation trains on it).

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
    return chosen, entropy if entropy_grad else entropy.detach()


def masked_mean(
    values: Tensor,
    mask: Tensor,
    aggregation: str = "token_mean",
    constant_normaliser: int | None = None,
) -> Tensor:
    """Aggregate masked token values: the mean of all tokens together (`token_mean`, alias
    `token-mean`), per sequence then over sequences (`sequence_mean`), or each sequence's token
    SUM divided by `constant_normaliser` (the maximum response length), then the mean over
    sequences (`seq-mean-token-sum-norm`: no length bias, Dr. GRPO)."""
    mask = mask.to(values.dtype)
    if aggregation in ("token_mean", "token-mean"):
        return (values * mask).sum() / mask.sum().clamp(min=1)
    if aggregation == "sequence_mean":
        per_sequence = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_sequence.mean()
    if aggregation == "seq-mean-token-sum-norm":
        if not constant_normaliser or constant_normaliser < 1:
            raise ValueError(
                "loss aggregation 'seq-mean-token-sum-norm' needs constant_normaliser >= 1 "
                f"(the maximum response length), got {constant_normaliser}"
            )
        return ((values * mask).sum(dim=1) / constant_normaliser).mean()
    raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got '{aggregation}'")
