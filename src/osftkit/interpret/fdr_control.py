"""False-discovery-rate procedures: Benjamini-Hochberg/Yekutieli and the knockoff threshold."""

from typing import Literal

import torch
from scipy.stats import false_discovery_control
from torch import Tensor

FdrMethod = Literal["bh", "by"]


def check_alpha(alpha: float) -> None:
    """Raise unless 0 < alpha < 1."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def step_up_reject(pvalues: Tensor, alpha: float, method: FdrMethod = "bh") -> Tensor:
    """Boolean mask (same shape as pvalues) of hypotheses rejected by a step-up procedure:
    Benjamini-Hochberg ("bh", independence or positive dependence) or Benjamini-Yekutieli
    ("by", any dependence)."""
    check_alpha(alpha)
    if pvalues.numel() == 0:
        raise ValueError("step_up_reject needs at least one p-value")
    if torch.isnan(pvalues).any() or (pvalues < 0).any() or (pvalues > 1).any():
        raise ValueError("p-values must lie in [0, 1] and not be NaN")
    flat = pvalues.detach().double().flatten().cpu().numpy()
    adjusted = torch.from_numpy(false_discovery_control(flat, method=method))
    return (adjusted <= alpha).view(pvalues.shape).to(pvalues.device)


def knockoff_threshold(statistics: Tensor, alpha: float, offset: int = 1) -> float:
    """Smallest z > 0 with (offset + #{T <= -z}) / max(1, #{T >= z}) <= alpha; inf if none.

    offset=1 is the conservative knockoff+ rule, offset=0 the plain knockoff rule.
    """
    check_alpha(alpha)
    if offset not in (0, 1):
        raise ValueError(f"offset must be 0 or 1, got {offset}")
    flat = statistics.detach().double().flatten().cpu()
    if flat.numel() == 0 or torch.isnan(flat).any():
        raise ValueError("knockoff_threshold needs at least one statistic and no NaN")
    candidates = flat.abs().unique()  # sorted ascending
    candidates = candidates[candidates > 0]
    ordered = flat.sort().values
    negatives = torch.searchsorted(ordered, -candidates, right=True)
    positives = ordered.numel() - torch.searchsorted(ordered, candidates, right=False)
    ratio = (offset + negatives) / positives.clamp(min=1)
    passing = candidates[ratio <= alpha]
    return passing[0].item() if passing.numel() else float("inf")


def knockoff_reject(statistics: Tensor, alpha: float, offset: int = 1) -> Tensor:
    """Discoveries of the knockoff filter: every statistic at or above the threshold."""
    return statistics >= knockoff_threshold(statistics, alpha, offset)
