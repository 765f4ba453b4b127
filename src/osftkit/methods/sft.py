"""SFTModule: masked token NLL on the reference responses."""

from osftkit.methods.base import CausalLMModule


class SFTModule(CausalLMModule):
    """Supervised fine-tuning; also plants backdoors and builds the offline bases."""

    def training_step(self, batch: dict, batch_idx: int) -> None:
        loss_mask = batch["labels"][:, 1:] != -100
        loss, entropy = self.response_nll(batch["input_ids"], batch["attention_mask"], loss_mask)
        self.update(loss)
        self.log_dict({"train/loss": loss, "train/entropy": entropy}, prog_bar=True)
