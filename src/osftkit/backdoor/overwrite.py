"""Planting (SFT on poisoned data; also the plain-SFT baseline) and Overwrite SFT."""

import random

from torch import Tensor

from osftkit.backdoor.evaluation import BackdoorEvalModule
from osftkit.backdoor.splice import IGNORE_INDEX
from osftkit.methods.sft import SFTModule


class BackdoorSFTModule(SFTModule, BackdoorEvalModule):
    """SFT with backdoor metrics: plants a backdoor on poisoned data (`method=backdoor`), and is
    the plain-SFT baseline on clean data, which never visits the trigger."""


class OverwriteSFTModule(BackdoorEvalModule):
    """Trigger known: SFT on (prompt with the real trigger inserted as planted -> clean
    response); with `output_clean_logits` averaged with plain (prompt -> clean response) SFT on
    the same batch (the reference's name for training the clean pair beside the triggered one).
    Each row draws its own trigger when there are several."""

    def __init__(self, *args, output_clean_logits: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.output_clean_logits = output_clean_logits

    def training_step(self, batch: dict, batch_idx: int) -> None:
        loss = self.overwrite_loss(batch)
        self.update(loss)
        self.log("train/loss", loss, prog_bar=True)

    def overwrite_loss(self, batch: dict) -> Tensor:
        """Response NLL with the trigger inserted [averaged with the clean pair's]."""
        triggered = self.triggered_batch(batch, None, random.Random(self.global_step))
        loss = self.sft_nll(triggered)
        if self.output_clean_logits:
            loss = (loss + self.sft_nll(batch)) / 2
        return loss

    def sft_nll(self, batch: dict) -> Tensor:
        """Token-mean NLL of the labelled response tokens."""
        loss_mask = batch["labels"][:, 1:] != IGNORE_INDEX
        return self.response_nll(batch["input_ids"], batch["attention_mask"], loss_mask)[0]
