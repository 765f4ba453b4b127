"""Realised false discovery rate and true positive rate of feature-test discoveries."""

import torch
from torch import Tensor
from torchmetrics.classification import BinaryStatScores
from torchmetrics.functional.classification import binary_precision_recall_curve


class DiscoveryRates(BinaryStatScores):
    """Realised FDR = FP / max(1, FP + TP) (0 when nothing was discovered) and TPR =
    TP / max(1, TP + FN) (the fraction of truly important features discovered), accumulated over
    (discoveries, truth) pairs."""

    def update(self, discoveries: Tensor, truth: Tensor) -> None:  # type: ignore[override]
        super().update(discoveries.long(), truth.long())

    def compute(self) -> dict[str, Tensor]:
        tp, fp, _, fn = self._final_state()
        return {
            "fdr": fp.float() / (tp + fp).clamp(min=1),
            "tpr": tp.float() / (tp + fn).clamp(min=1),
        }


def fdr_tpr(discoveries: Tensor, truth: Tensor) -> tuple[float, float]:
    """Realised (FDR, TPR) of one set of discoveries."""
    rates = DiscoveryRates()(discoveries, truth)
    return rates["fdr"].item(), rates["tpr"].item()


def fdr_tpr_curve(scores: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """(FDR, TPR) of selecting the top-k pooled scores, for every threshold k."""
    # Dense ranks in [0, 1] keep ties tied and stop torchmetrics from applying a sigmoid.
    ranks = torch.unique(scores.flatten().float(), return_inverse=True)[1].float()
    preds = ranks / ranks.max().clamp(min=1)
    precision, recall, _ = binary_precision_recall_curve(preds, truth.flatten().long())
    return 1 - precision, recall


def best_tpr_at_fdr(scores: Tensor, truth: Tensor, max_fdr: float) -> float:
    """Highest TPR among top-k selections whose realised FDR is at most max_fdr (0 if none)."""
    fdr, tpr = fdr_tpr_curve(scores, truth)
    ok = fdr <= max_fdr
    return tpr[ok].max().item() if ok.any() else 0.0
