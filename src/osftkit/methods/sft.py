"""SFTModule: masked token NLL on the reference responses."""

from osftkit.methods.base import CausalLMModule
from osftkit.methods.micro_batches import TokenBatch, response_mask
from osftkit.methods.optimisation import weighted
from osftkit.recipes import SFTRecipe


class SFTModule(CausalLMModule):
    """Supervised fine-tuning; also plants backdoors and builds the offline bases."""

    recipe_type = SFTRecipe

    def training_step(self, batch: dict, batch_idx: int) -> None:
        loss_mask = response_mask(batch["labels"])
        tokens = weighted(TokenBatch(batch["input_ids"], batch["attention_mask"], loss_mask))
        totals = self.gradient_step(self.micro_batches(tokens), self.nll_loss)
        self.log_dict(
            {"train/loss": totals["loss"], "train/entropy": totals["entropy"]}, prog_bar=True
        )
