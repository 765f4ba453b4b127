"""Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), averaged over problems; and
SePT's AVG, the mean of the reported pass@k (pass@1, 8, 32 in its protocol)."""

import torch
from torch import Tensor
from torchmetrics import Metric


def pass_at_k(num_samples: Tensor, num_correct: Tensor, k: int) -> Tensor:
    """Per-problem unbiased pass@k, as the stable product 1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    n, c = num_samples.double(), num_correct.double()
    if bool((n < k).any()):
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {int(n.min())}")
    i = torch.arange(1, int(n.max()) + 1, dtype=torch.float64, device=n.device)
    in_product = (i[None, :] > (n - c)[:, None]) & (i[None, :] <= n[:, None])
    factors = torch.where(in_product, 1.0 - k / i[None, :], torch.ones_like(i[None, :]))
    return 1.0 - factors.prod(dim=1)


def counted_rows(batch: dict) -> Tensor:
    """(problems,) booleans: the rows of an evaluation batch a metric counts, not the padding
    that evens out the ranks' steps (`is_padding`, set by the data module's sampler)."""
    padding = batch.get("is_padding")
    if padding is None:
        return torch.ones(len(batch["problem"]), dtype=torch.bool)
    return ~padding


class PassAtK(Metric):
    """Mean unbiased pass@k for each k in `ks` and `avg` (their mean, SePT's AVG), updated with
    per-problem success matrices."""

    full_state_update = False

    def __init__(self, ks: list[int], **kwargs) -> None:
        super().__init__(**kwargs)
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive integers, got {ks}")
        self.ks = sorted(set(int(k) for k in ks))
        self.add_state("num_samples", default=[], dist_reduce_fx="cat")
        self.add_state("num_correct", default=[], dist_reduce_fx="cat")

    def update(self, correct: Tensor, counted: Tensor | None = None) -> None:
        """`correct`: (problems, samples) booleans, one row per problem; `counted`: (problems,)
        booleans, False for a row that repeats a problem another rank counts (padding)."""
        if counted is not None:
            correct = correct[counted.to(correct.device)]
        self.num_samples.append(
            torch.full((correct.shape[0],), correct.shape[1], device=self.device)
        )
        self.num_correct.append(correct.sum(dim=1).to(self.device))

    def compute(self) -> dict[str, Tensor]:
        n = torch.cat(self.num_samples) if isinstance(self.num_samples, list) else self.num_samples
        c = torch.cat(self.num_correct) if isinstance(self.num_correct, list) else self.num_correct
        scores = {f"pass@{k}": pass_at_k(n, c, k).mean().float() for k in self.ks}
        return {**scores, "avg": torch.stack(list(scores.values())).mean()}
