"""Score functions for causal LMs: the feature test on prompt tokens (e.g. trigger discovery).

With ``score_fn = target_logprob(model, targets)`` and the prompt token positions as features,
the one-shot test or the IRT asks which prompt tokens make the model likely to emit
``targets[i]`` (a backdoor's marker, a reference answer) after prompt i.
"""

import torch
from torch import Tensor, nn

from osftkit.interpret.tests import ScoreFn


def target_logprob(
    model: nn.Module, targets: Tensor, attention_mask: Tensor | None = None
) -> ScoreFn:
    """score_fn(prompts (b, L), instance (b,)) = log p(targets[instance] | prompt), summed over
    the target tokens; one batched forward pass per call.

    targets (n, T) holds one target per original prompt. Prompts of different lengths should be
    left-padded with ``attention_mask`` (n, L) marking real tokens; padded positions are not
    features to test (their feature ids can simply be excluded from the reported discoveries).
    """

    def score(prompts: Tensor, instance: Tensor) -> Tensor:
        target = targets[instance].to(prompts.device)
        ids = torch.cat([prompts, target], dim=1)
        mask = None
        if attention_mask is not None:
            mask = torch.cat([attention_mask[instance], torch.ones_like(target)], dim=1)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, prompts.shape[1] - 1 : -1]
        return logits.float().log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1)

    return score
