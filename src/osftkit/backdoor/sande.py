"""SANDE (trigger unknown): simulate the trigger with a learned parrot, then eliminate it."""

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import Metric

from osftkit.backdoor.evaluation import BackdoorEvalModule
from osftkit.backdoor.metrics import AttackSuccessRate
from osftkit.backdoor.poison import token_ids
from osftkit.backdoor.splice import (
    IGNORE_INDEX,
    first_targets,
    response_starts,
    splice,
    splice_inputs,
)
from osftkit.methods.losses import position_ids_from_mask

log = logging.getLogger(__name__)

STAGES = ("simulate", "eliminate", "both")
PARROT_INITS = ("zeros", "random")
PARROT_FILE = "parrot.safetensors"


def cosine_with_warmup(start: int, steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR factor for a stage that runs `steps` optimiser steps from global step `start`."""
    warmup = max(1, math.ceil(warmup_ratio * steps))

    def factor(step: int) -> float:
        t = min(max(step - start, 0), steps)
        return min(1.0, (t + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * t / max(steps, 1)))

    return factor


class SANDEModule(BackdoorEvalModule):
    """Trigger unknown, triggered response (or its first `known_marker_tokens` tokens) known.

    simulate: the model is frozen and only the parrot (k embedding vectors after the role tag)
    learns, so that clean prompt + parrot yields `<marker>.` (loss on the first
    `simulate_loss_tokens` target tokens, at most the known ones). eliminate: the parrot is
    frozen and the model learns clean prompt + parrot -> clean response (loss on the first
    `eliminate_loss_tokens` tokens, or the whole response when None). With `clean_mix` > 0 the
    eliminate loss is (1 - clean_mix) * that + clean_mix * (clean prompt, no parrot -> clean
    response) on the same batch, as Overwrite SFT mixes clean pairs in to keep utility; the
    reference eliminate stage has no clean term (clean_mix 0). With `random_parrot_length`
    each eliminate batch splices only the parrot's first k' vectors (k' uniform in 1..k), since a
    trigger shorter than the parrot leaves the model in a context the whole parrot never
    visits (not in the reference).
    stage=both runs `simulate_steps` simulate steps, then eliminate until trainer.max_steps.
    The parrot is saved as parrot.safetensors in the run directory, with its nearest tokens.
    """

    def __init__(
        self,
        *args,
        stage: str = "both",
        simulate_steps: int = 25,
        parrot_tokens: int = 6,
        parrot_init: str = "zeros",
        parrot_path: str | None = None,
        parrot_lr: float = 1e-3,
        parrot_betas: Sequence[float] = (0.9, 0.95),
        warmup_ratio: float = 0.03,
        simulate_loss_tokens: int = 1,
        eliminate_loss_tokens: int | None = 10,
        known_marker_tokens: int | None = None,
        clean_mix: float = 0.0,
        random_parrot_length: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= clean_mix <= 1.0:
            raise ValueError(f"clean_mix must lie in [0, 1], got {clean_mix}")
        if eliminate_loss_tokens is not None and eliminate_loss_tokens < 1:
            raise ValueError(
                f"eliminate_loss_tokens must be positive or null (whole response), "
                f"got {eliminate_loss_tokens}"
            )
        self.clean_mix, self.random_parrot_length = clean_mix, random_parrot_length
        if stage not in STAGES:
            raise ValueError(f"SANDE stage must be one of {STAGES}, got '{stage}'")
        if parrot_init not in PARROT_INITS:
            raise ValueError(f"parrot_init must be one of {PARROT_INITS}, got '{parrot_init}'")
        self.stage, self.simulate_steps = stage, simulate_steps
        self.parrot_lr, self.parrot_betas, self.warmup_ratio = (
            parrot_lr,
            tuple(parrot_betas),
            warmup_ratio,
        )
        # With partial knowledge the tokens after the known ones are unknown: never supervised.
        self.simulate_loss_tokens = min(simulate_loss_tokens, known_marker_tokens or math.inf)
        self.eliminate_loss_tokens = eliminate_loss_tokens
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        shape = (parrot_tokens, self.model.get_input_embeddings().weight.shape[1])
        self.parrot = nn.Parameter(
            load_parrot(parrot_path, shape)
            if parrot_path
            else self.initial_parrot(parrot_init, shape)
        )
        marker = token_ids(self.tokenizer, f"{self.backdoor.marker}.", "marker")
        self.register_buffer(
            "marker_ids", torch.tensor(marker[:known_marker_tokens]), persistent=False
        )

    def initial_parrot(self, init: str, shape: tuple[int, int]) -> Tensor:
        if init == "zeros":
            return torch.zeros(shape)
        return torch.randn(shape) * self.model.get_input_embeddings().weight.detach().float().std()

    # ---- stages -------------------------------------------------------------------------
    def simulate_span(self) -> int:
        """Number of optimiser steps spent simulating."""
        return {"simulate": self.trainer.max_steps, "eliminate": 0, "both": self.simulate_steps}[
            self.stage
        ]

    @property
    def current_stage(self) -> str:
        if self.stage != "both":
            return self.stage
        return "simulate" if self.global_step < self.simulate_steps else "eliminate"

    def configure_optimizers(self):
        if self.trainer.max_steps <= 0 or (
            self.stage == "both" and self.trainer.max_steps <= self.simulate_steps
        ):
            raise ValueError(
                f"SANDE needs trainer.max_steps > simulate_steps ({self.simulate_steps}) "
                f"for stage=both, and a positive max_steps otherwise"
            )
        optimizer = self.optimizer_factory(params=self.trainable)
        optimizer.add_param_group(
            {
                "params": [self.parrot],
                "lr": self.parrot_lr,
                "betas": self.parrot_betas,
                "weight_decay": 0.0,
            }
        )
        span, total = self.simulate_span(), self.trainer.max_steps
        factors = [
            cosine_with_warmup(span, total - span, self.warmup_ratio),
            cosine_with_warmup(0, span, self.warmup_ratio),
        ]
        scheduler = LambdaLR(optimizer, factors)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def with_marker(self, batch: dict) -> dict:
        """The batch with the known marker tokens opening every response (the triggered target)."""
        ids, labels = batch["input_ids"], batch["labels"]
        starts = response_starts(labels)
        marker = self.marker_ids.expand(ids.shape[0], -1)
        return {
            "input_ids": splice(ids, marker, starts),
            "attention_mask": splice(batch["attention_mask"], torch.ones_like(marker), starts),
            "labels": splice(labels, marker, starts),
        }

    def stage_loss(self, batch: dict) -> Tensor:
        """The loss of the current stage, with only that stage's parameters trainable."""
        simulate = self.current_stage == "simulate"
        for parameter in self.trainable:
            parameter.requires_grad_(not simulate)
        self.parrot.requires_grad_(simulate)
        if simulate:
            return self.stand_in_loss(
                self.with_marker(batch), self.parrot, self.simulate_loss_tokens
            )
        loss = self.stand_in_loss(batch, self.eliminate_parrot(), self.eliminate_loss_tokens)
        if self.clean_mix > 0:
            loss = (1 - self.clean_mix) * loss + self.clean_mix * self.clean_loss(batch)
        return loss

    def eliminate_parrot(self) -> Tensor:
        """The parrot for one eliminate batch: whole, or (random_parrot_length) its first k'
        vectors, k' uniform in 1..k, so that triggers shorter than the parrot are covered."""
        if not self.random_parrot_length:
            return self.parrot
        return self.parrot[: int(torch.randint(1, self.parrot.shape[0] + 1, ()))]

    def clean_loss(self, batch: dict) -> Tensor:
        """Token NLL of (clean prompt, no parrot -> clean response), same response tokens as
        the parrot term (the first `eliminate_loss_tokens`, or all)."""
        labels = batch["labels"]
        if self.eliminate_loss_tokens is not None:
            labels = first_targets(labels, self.eliminate_loss_tokens)
        mask = batch["attention_mask"]
        logits = self.model(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
        ).logits
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )

    def training_step(self, batch: dict, batch_idx: int) -> None:
        stage = self.current_stage
        loss = self.stage_loss(batch)
        self.update(loss)
        self.log(f"train/{stage}_loss", loss, prog_bar=True)

    # ---- the parrot: evaluation, saving, nearest tokens ---------------------------------
    def backdoor_metrics(self) -> dict[str, Metric]:
        return {**super().backdoor_metrics(), "parrot_asr": AttackSuccessRate(self.backdoor.marker)}

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().validation_step(batch, batch_idx, dataloader_idx)
        metrics = self.val_metrics[self.trainer.datamodule.val_names[dataloader_idx]]
        metrics["parrot_asr"].update(self.generate_with_parrot(batch, self.backdoor.asr_new_tokens))

    @torch.no_grad()
    def generate_with_parrot(self, batch: dict, max_new_tokens: int) -> list[str]:
        """Greedy responses to the clean prompts with the parrot where the trigger would sit."""
        ids = batch["prompt_ids"]
        positions = self.tag_positions(ids, torch.full_like(ids[:, 0], ids.shape[1]))
        embeds, mask, _, _ = splice_inputs(
            self.embed(ids), batch["prompt_mask"], None, self.parrot, positions
        )
        output = self.model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return self.tokenizer.batch_decode(output, skip_special_tokens=True)

    def nearest_tokens(self, count: int = 3) -> list[list[str]]:
        """For each parrot vector, the vocabulary tokens with the most similar embeddings."""
        table = F.normalize(self.model.get_input_embeddings().weight.detach().float(), dim=-1)
        similarity = F.normalize(self.parrot.detach().float(), dim=-1) @ table.T
        nearest = similarity.topk(count).indices.tolist()
        return [[self.tokenizer.decode(token) for token in row] for row in nearest]

    def on_train_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        directory = Path(self.trainer.default_root_dir)
        save_file({"parrot": self.parrot.detach().cpu().contiguous()}, directory / PARROT_FILE)
        nearest = self.nearest_tokens()
        (directory / "parrot_nearest_tokens.json").write_text(json.dumps(nearest))
        log.info(
            "Parrot saved to %s; nearest tokens per vector: %s", directory / PARROT_FILE, nearest
        )
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(
                    "parrot/nearest_tokens", json.dumps(nearest), self.global_step
                )


def load_parrot(path: str, shape: tuple[int, int]) -> Tensor:
    """A saved parrot; its shape must be (parrot_tokens, hidden size of the model)."""
    parrot = load_file(path)["parrot"]
    if tuple(parrot.shape) != shape:
        raise ValueError(
            f"Parrot file '{path}' holds shape {tuple(parrot.shape)}, but this model needs "
            f"{shape} (parrot_tokens, hidden size)"
        )
    return parrot.float()

