"""The feature score of a causal LM, log p(target | prompt): the feature test on prompt tokens
(e.g. trigger discovery).

With ``score_fn = target_logprob(model, targets)`` and the prompt token positions as features,
the one-shot test or the IRT asks which prompt tokens make the model likely to emit
``targets[i]`` (a backdoor's marker, a reference answer) after prompt i.
"""

import torch
from torch import Tensor, nn

from osftkit.interpret.feature_test import FeatureScoreFn
from osftkit.models.logprobs import token_logprobs


def target_logprob(
    model: nn.Module, targets: Tensor, attention_mask: Tensor | None = None
) -> FeatureScoreFn:
    """score_fn(prompts (b, L), instance (b,)) = log p(targets[instance] | prompt), summed over
    the target tokens; one batched forward pass per call, through the one log-prob path.

    targets (n, T) holds one target per original prompt. Prompts of different lengths should be
    left-padded with ``attention_mask`` (n, L) marking real tokens; padded positions are not
    features to test (their feature ids can simply be excluded from the reported discoveries).
    """

    def score(prompts: Tensor, instance: Tensor) -> Tensor:
        target = targets[instance].to(prompts.device)
        ids = torch.cat([prompts, target], dim=1)
        prompt_mask = (
            torch.ones_like(prompts) if attention_mask is None else attention_mask[instance]
        )
        mask = torch.cat([prompt_mask.to(prompts.device), torch.ones_like(target)], dim=1)
        # Position t scores token t + 1: the target tokens are scored from position L - 1 on.
        scored = torch.zeros_like(ids[:, 1:], dtype=torch.bool)
        scored[:, prompts.shape[1] - 1 :] = True
        logp, _ = token_logprobs(
            model, input_ids=ids, attention_mask=mask, score_mask=scored, with_entropy=False
        )
        return logp.sum(-1)

    return score
