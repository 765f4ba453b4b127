"""Overwrite SFT: SFT on (prompt with the known trigger inserted -> clean response)."""

import random

from torch import Tensor

from osftkit.backdoor.backdoor_module import BackdoorModule
from osftkit.recipes import OverwriteRecipe


class OverwriteSFTModule(BackdoorModule):
    """Trigger known: SFT on (prompt with the trigger inserted as planted -> clean response);
    with `output_clean_logits` averaged with plain (prompt -> clean response) SFT on the same
    batch (the reference's name for training the clean pair beside the triggered one). Each row
    draws its own trigger when there are several.

    The trigger trained on is `removal_triggers` when given (e.g. the phrases trigger discovery
    confirmed), else the planted `backdoor.triggers`; ASR is always measured with the planted
    trigger, so a wrong candidate cannot score its own success."""

    recipe: OverwriteRecipe
    recipe_type = OverwriteRecipe

    def training_step(self, batch: dict, batch_idx: int) -> None:
        totals = self.gradient_step([batch], lambda b: (self.overwrite_loss(b), {}))
        self.log("train/loss", totals["loss"], prog_bar=True)

    def overwrite_loss(self, batch: dict) -> Tensor:
        """Response NLL with the trigger inserted [averaged with the clean pair's]."""
        rng = random.Random(self.global_step)
        triggers = None
        removal = self.recipe.removal_triggers
        if removal is not None:
            triggers = [[rng.choice(removal)] for _ in batch["problem"]]
        triggered = self.triggered_batch(batch, triggers, rng)
        loss = self.labelled_nll(triggered)
        if self.recipe.output_clean_logits:
            loss = (loss + self.labelled_nll(batch)) / 2
        return loss
