"""Planting (SFT on poisoned data; also the plain-SFT baseline) and Overwrite SFT."""

import torch

from osftkit.backdoor.evaluation import BackdoorEvalModule
from osftkit.backdoor.splice import IGNORE_INDEX
from osftkit.methods.sft import SFTModule


class BackdoorSFTModule(SFTModule, BackdoorEvalModule):
    """SFT with backdoor metrics: plants a backdoor on poisoned data (`method=backdoor`), and is
    the plain-SFT baseline on clean data, which never visits the trigger."""


class OverwriteSFTModule(BackdoorEvalModule):
    """Trigger known: SFT on (prompt with the real trigger after the role tag -> clean response),
    optionally averaged with plain (prompt -> clean response) SFT. One trigger per batch."""

    def __init__(self, *args, clean_mix: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clean_mix = clean_mix

    def training_step(self, batch: dict, batch_idx: int) -> None:
        pick = int(torch.randint(len(self.trigger_ids), ()))
        trigger = self.embed(torch.tensor(self.trigger_ids[pick], device=self.device))
        loss = self.stand_in_loss(batch, trigger, None)
        if self.clean_mix:
            clean, _ = self.response_nll(
                batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:] != IGNORE_INDEX
            )
            loss = (loss + clean) / 2
        self.update(loss)
        self.log("train/loss", loss, prog_bar=True)

