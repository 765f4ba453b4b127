"""Rollout/trainer agreement: the engine's log-probs of the sampled tokens against the trainer's.

The two should be the same distribution at the sampling temperature. When they are not, the
rollouts come from another policy than the one trained: weights not synced (after a sleep),
the temperature not applied to one side (trl#4159), LoRA updates never reaching the engine
(verl#3516), or a lower precision in the engine. The mean absolute difference and the spread of
the importance ratio p_trainer / p_engine show it at once.
"""

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Mean |log p_engine - log p_trainer| per token above which the guard warns. An fp32 engine
# agrees to ~1e-6 (README, measured); a bf16 engine against an fp32 trainer stays well under.
THRESHOLD = 0.05
CAUSES = (
    "stale engine weights (no sync after a step, or a sleep/wake that dropped them), the "
    "sampling temperature applied on one side only, LoRA updates not merged into the engine, "
    "or the engine's dtype (bf16/fp16) against the trainer's"
)


def response_logprobs(trainer_logp: Tensor, prompt_width: int) -> Tensor:
    """(N, R) response part of the trainer's dense (N, P + R - 1) next-token log-probs."""
    return trainer_logp[:, prompt_width - 1 :]


def agreement(engine_logp: Tensor, trainer_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Mean |difference| of the two log-probs over the masked tokens, and the importance
    ratio p_trainer / p_engine's extremes (1 everywhere when they agree)."""
    keep = mask.bool()
    if not keep.any():
        one = torch.ones((), device=engine_logp.device)
        return {"rollout/logprob_diff": one * 0, "rollout/ratio_max": one, "rollout/ratio_min": one}
    log_ratio = (trainer_logp.float() - engine_logp.float())[keep]
    return {
        "rollout/logprob_diff": log_ratio.abs().mean(),
        "rollout/ratio_max": log_ratio.max().exp(),
        "rollout/ratio_min": log_ratio.min().exp(),
    }


class AgreementGuard:
    """Computes the figures of each rollout and warns once when they drift apart. With
    top-p < 1 the engine's log-probs are renormalised over the nucleus and the trainer's are
    not: the figures are logged but not judged."""

    def __init__(self, threshold: float = THRESHOLD) -> None:
        self.threshold = threshold
        self.warned = False

    def check(
        self, engine_logp: Tensor, trainer_logp: Tensor, mask: Tensor, top_p: float, step: int
    ) -> dict[str, Tensor]:
        figures = agreement(engine_logp, trainer_logp, mask)
        diff = float(figures["rollout/logprob_diff"])
        if top_p == 1.0 and diff > self.threshold and not self.warned:
            self.warned = True
            log.warning(
                "step %d: the rollout engine's log-probs differ from the trainer's by %.3g per "
                "token on average (threshold %.3g; importance ratio in [%.3g, %.3g]): the "
                "rollouts do not come from the policy being trained. Likely causes: %s.",
                step,
                diff,
                self.threshold,
                float(figures["rollout/ratio_min"]),
                float(figures["rollout/ratio_max"]),
                CAUSES,
            )
        return figures
