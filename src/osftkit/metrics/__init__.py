"""torchmetrics metrics of the kit."""

from osftkit.metrics.pass_at_k import PassAtK, pass_at_k

__all__ = ["PassAtK", "pass_at_k"]
