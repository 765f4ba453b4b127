"""A plain supervised LightningModule (regression or classification) that the
FeatureTestCallback can question: it implements ``feature_test_inputs(batch)``. It lives in the
interpret room because it exists to be questioned (it is not an LM method)."""

from collections.abc import Callable, Sequence
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osftkit.interpret.feature_test import FeatureScoreFn, FeatureTestInputs

Task = Literal["regression", "classification"]


class PredictorModule(L.LightningModule):
    """Fits `model` on batches (x, y[, truth]) with MSE (regression) or cross-entropy.

    The data's feature grouping (``feature_mask``, ids 0..d-1 over an input) and, for text, its
    ``token_strings`` are handed at construction (train.py hands the datamodule's).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        task: Task = "regression",
        feature_mask: Tensor | None = None,
        token_strings: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "feature_mask", "token_strings"], logger=False)
        if task not in ("regression", "classification"):
            raise ValueError(f"method.task must be regression or classification, got '{task}'")
        self.model, self.build_optimizer, self.task = model, optimizer, task
        self.feature_mask, self.token_strings = feature_mask, token_strings

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return out.squeeze(-1) if self.task == "regression" else out

    def _loss(self, batch: tuple[Tensor, ...], stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        out = self(x)
        if self.task == "regression":
            loss = F.mse_loss(out, y)
        else:
            loss = F.cross_entropy(out, y)
            self.log(f"{stage}/acc", (out.argmax(-1) == y).float().mean(), prog_bar=True)
        self.log(f"{stage}/loss", loss, prog_bar=True)
        return loss

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self._loss(batch, "train")

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._loss(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.build_optimizer(params=self.parameters())

    def score_fn(self, x: Tensor) -> FeatureScoreFn:
        """Regression: the prediction. Classification: the log-odds of the class predicted on the
        original input x[instance]; unlike its probability, it does not saturate when the model
        is confident, so one feature's effect stays visible."""
        if self.task == "regression":
            return lambda inputs, instance: self(inputs)
        predicted = self(x).argmax(-1)

        def log_odds(inputs: Tensor, instance: Tensor) -> Tensor:
            logits, target = self(inputs), predicted[instance, None]
            rest = logits.scatter(1, target, -torch.inf).logsumexp(-1)
            return logits.gather(1, target).squeeze(1) - rest

        return log_odds

    @torch.no_grad()
    def feature_test_inputs(self, batch: tuple[Tensor, ...]) -> FeatureTestInputs:
        """Feature-test protocol: the batch's inputs, the score function, the handed feature
        grouping and vocabulary (for text); the truth mask when the batch carries one."""
        if self.feature_mask is None:
            raise ValueError(
                "PredictorModule was not handed a feature_mask: a feature test needs the data's "
                "feature grouping (PredictorModule(..., feature_mask=datamodule.feature_mask))"
            )
        x = batch[0].to(self.device)
        return FeatureTestInputs(
            inputs=x,
            score_fn=self.score_fn(x),
            feature_mask=self.feature_mask.to(self.device),
            truth=batch[2] if len(batch) > 2 else None,
            token_strings=self.token_strings,
        )
