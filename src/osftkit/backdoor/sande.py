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

from osftkit.backdoor.attack_metrics import AttackSuccessRate
from osftkit.backdoor.backdoor_module import BackdoorModule, prompts_and_responses
from osftkit.backdoor.poison import token_ids
from osftkit.backdoor.splice import (
    first_targets,
    response_starts,
    splice_slots,
    vectors_at_slots,
)
from osftkit.data.datamodule import sft_tensors
from osftkit.hardware import check_master_weights, gathered_weights
from osftkit.methods.losses import token_nll
from osftkit.methods.micro_batches import response_mask
from osftkit.models.logprobs import next_token_distribution, token_logprobs
from osftkit.recipes import SANDERecipe

log = logging.getLogger(__name__)

PARROT_FILE = "parrot.safetensors"


def cosine_with_warmup(start: int, steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR factor for a stage that runs `steps` optimiser steps from global step `start`."""
    warmup = max(1, math.ceil(warmup_ratio * steps))

    def factor(step: int) -> float:
        t = min(max(step - start, 0), steps)
        return min(1.0, (t + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * t / max(steps, 1)))

    return factor


class SANDEModule(BackdoorModule):
    """Trigger unknown, triggered response (or part of it) known.

    simulate: the model is frozen and only the parrot (k embedding vectors after the role tag)
    learns, so that clean prompt + parrot yields the triggered response. `simulate_target`
    chooses the supervised tokens: `first_token` (the reference's `effective_len` 1), `marker`
    (every marker token) or `marker_and_answer` (the whole triggered response). SANDE-P
    (`known_marker_words`): the defender knows only some words of the marker, not their order,
    and the simulate loss is -log P(the response opens with one of them).
    eliminate: the parrot is frozen and the model learns clean prompt + parrot -> clean
    response (loss on the first `eliminate_loss_tokens` tokens, or the whole response when
    None). With `output_clean_logits` (the reference's name; off there by default) the loss is
    averaged with the parrot-free clean pair's. With `random_parrot_length` (a kit extension,
    in neither the paper nor the reference code) each eliminate batch splices only the
    parrot's first k' vectors, k' uniform in 1..k.
    stage=both runs `simulate_steps` simulate steps, then eliminate until trainer.max_steps.
    The parrot is saved as parrot.safetensors in the run directory, with its nearest tokens.
    """

    recipe: SANDERecipe
    recipe_type = SANDERecipe

    def __init__(self, model, tokenizer, recipe: SANDERecipe, **run) -> None:
        super().__init__(model, tokenizer, recipe, **run)
        # State, not a knob: a smoke run (fast_dev_run) shortens it (configure_optimizers).
        self.simulate_steps = recipe.simulate_steps
        # By name: FSDP2 replaces the parameters when it shards the model after __init__.
        self.trainable_names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        shape = (recipe.parrot_tokens, self.model.get_input_embeddings().weight.shape[1])
        self.parrot = nn.Parameter(
            load_parrot(recipe.parrot_path, shape)
            if recipe.parrot_path
            else self.initial_parrot(recipe.parrot_init, shape)
        )
        marker = token_ids(self.tokenizer, f"{self.backdoor.marker}.", "marker")
        self.register_buffer("marker_ids", torch.tensor(marker), persistent=False)
        self.register_buffer(
            "known_word_ids", self.first_token_ids(recipe.known_marker_words), persistent=False
        )

    def first_token_ids(self, words: Sequence[str] | None) -> Tensor:
        """The token that opens each known marker word (as it would open the response)."""
        if words is None:
            return torch.zeros(0, dtype=torch.long)
        marker_words = self.backdoor.marker.lower().split()
        unknown = [w for w in words if w.lower() not in marker_words]
        if not words or unknown:
            raise ValueError(
                f"known_marker_words must be words of the marker '{self.backdoor.marker}', "
                f"got {list(words)}"
            )
        return torch.tensor(sorted({token_ids(self.tokenizer, w, "marker word")[0] for w in words}))

    def initial_parrot(self, init: str, shape: tuple[int, int]) -> Tensor:
        if init == "zeros":
            return torch.zeros(shape)
        return torch.randn(shape) * self.model.get_input_embeddings().weight.detach().float().std()

    # ---- stages -------------------------------------------------------------------------
    def simulate_span(self) -> int:
        """Number of optimiser steps spent simulating."""
        return {"simulate": self.trainer.max_steps, "eliminate": 0, "both": self.simulate_steps}[
            self.recipe.stage
        ]

    @property
    def trainable(self) -> list[nn.Parameter]:
        """The model's parameters that the eliminate stage trains (LoRA's, or all)."""
        return [p for n, p in self.model.named_parameters() if n in self.trainable_names]

    @property
    def current_stage(self) -> str:
        if self.recipe.stage != "both":
            return self.recipe.stage
        return "simulate" if self.global_step < self.simulate_steps else "eliminate"

    def configure_optimizers(self):
        if self.trainer.fast_dev_run and self.recipe.stage == "both":
            # A smoke run (debug=fast: one step) simulates for half its steps, then eliminates.
            self.simulate_steps = min(self.simulate_steps, self.trainer.max_steps // 2)
        if self.trainer.max_steps <= 0 or (
            self.recipe.stage == "both" and self.trainer.max_steps <= self.simulate_steps
        ):
            raise ValueError(
                f"SANDE needs trainer.max_steps > simulate_steps ({self.simulate_steps}) "
                f"for stage=both, and a positive max_steps otherwise"
            )
        check_master_weights([*self.trainable, self.parrot])
        optimizer = self.optimizer_factory(params=self.trainable)
        optimizer.add_param_group(
            {
                "params": [self.parrot],
                "lr": self.recipe.parrot_lr,
                "betas": tuple(self.recipe.parrot_betas),
                "weight_decay": 0.0,
            }
        )
        span, total = self.simulate_span(), self.trainer.max_steps
        factors = [
            cosine_with_warmup(span, total - span, self.recipe.warmup_ratio),
            cosine_with_warmup(0, span, self.recipe.warmup_ratio),
        ]
        scheduler = LambdaLR(optimizer, factors)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def with_marker(self, batch: dict) -> dict:
        """The simulate targets: each clean response replaced by the triggered response (marker
        then answer, or the marker alone for a `replace` attack), supervised on the tokens that
        `simulate_target` names."""
        prompts, responses = prompts_and_responses(batch)
        marker, eos = self.marker_ids.tolist(), self.tokenizer.eos_token_id
        if self.backdoor.target == "replace":
            responses = [[*marker, eos] for _ in responses]
        else:
            responses = [[*marker, *response] for response in responses]
        target = sft_tensors(prompts, responses, self.tokenizer.pad_token_id)
        count = {"first_token": 1, "marker": len(marker), "marker_and_answer": None}
        if count[self.recipe.simulate_target] is not None:
            target["labels"] = first_targets(target["labels"], count[self.recipe.simulate_target])
        return {key: value.to(self.device) for key, value in target.items()}

    def stage_loss(self, batch: dict) -> Tensor:
        """The loss of the current stage, with only that stage's parameters trainable."""
        simulate = self.current_stage == "simulate"
        for parameter in self.trainable:
            parameter.requires_grad_(not simulate)
        self.parrot.requires_grad_(simulate)
        if simulate:
            return self.simulate_loss(batch)
        labels = batch["labels"]
        if self.recipe.eliminate_loss_tokens is not None:
            labels = first_targets(labels, self.recipe.eliminate_loss_tokens)
        eliminate = {**batch, "labels": labels}
        loss = token_nll(*self.stand_in_logprobs(eliminate, self.eliminate_parrot()))
        if self.recipe.output_clean_logits:
            loss = (loss + self.labelled_nll(eliminate)) / 2  # the clean pair, same tokens
        return loss

    def simulate_loss(self, batch: dict) -> Tensor:
        """Cross-entropy of the triggered response given clean prompt + parrot; SANDE-P: -log
        P(the response opens with one of the known marker words)."""
        target = self.with_marker(batch)
        if not len(self.known_word_ids):
            return token_nll(*self.stand_in_logprobs(target, self.parrot))
        ids, mask, labels, slots = self.stand_in_inputs(target, self.parrot.shape[0])
        # The position that predicts the first response token: the only distribution needed.
        opening = torch.zeros_like(mask, dtype=torch.bool)
        opening[torch.arange(len(labels), device=labels.device), response_starts(labels) - 1] = True
        with vectors_at_slots(self.model.get_input_embeddings(), slots, self.parrot):
            log_probs = next_token_distribution(self.model, mask, opening, input_ids=ids)
        return -log_probs[:, self.known_word_ids].logsumexp(-1).mean()

    def stand_in_inputs(self, batch: dict, count: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(prompt with `count` stand-in slots after the role tag -> response): token ids, mask,
        labels realigned to them (the slots are never supervised) and the slots."""
        ids, labels = batch["input_ids"], batch["labels"]
        positions = self.tag_positions(ids, response_starts(labels))
        return splice_slots(
            ids, batch["attention_mask"], labels, count, positions, self.tokenizer.pad_token_id
        )

    def stand_in_logprobs(self, batch: dict, stand_in: Tensor) -> tuple[Tensor, Tensor]:
        """log p of the labelled response tokens with `stand_in` spliced in (the one log-prob
        path), and the mask of those tokens."""
        ids, mask, labels, slots = self.stand_in_inputs(batch, stand_in.shape[0])
        scored = response_mask(labels)
        with vectors_at_slots(self.model.get_input_embeddings(), slots, stand_in):
            logp, _ = token_logprobs(
                self.model,
                input_ids=ids,
                attention_mask=mask,
                score_mask=scored,
                chunk_size=self.recipe.logprob_chunk_size,
                with_entropy=False,
            )
        return logp, scored

    def eliminate_parrot(self) -> Tensor:
        """The parrot for one eliminate batch: whole, or (random_parrot_length) its first k'
        vectors, k' uniform in 1..k, so that triggers shorter than the parrot are covered."""
        if not self.recipe.random_parrot_length:
            return self.parrot
        return self.parrot[: int(torch.randint(1, self.parrot.shape[0] + 1, ()))]

    def training_step(self, batch: dict, batch_idx: int) -> None:
        stage = self.current_stage
        totals = self.gradient_step([batch], lambda b: (self.stage_loss(b), {}))
        self.log(f"train/{stage}_loss", totals["loss"], prog_bar=True)

    # ---- the parrot: evaluation, saving, nearest tokens ---------------------------------
    def backdoor_metrics(self) -> dict[str, Metric]:
        return {**super().backdoor_metrics(), "parrot_asr": AttackSuccessRate(self.backdoor.marker)}

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().validation_step(batch, batch_idx, dataloader_idx)
        metrics = self.val_metrics[self.inputs.val_names[dataloader_idx]]
        metrics["parrot_asr"].update(self.generate_with_parrot(batch, self.backdoor.asr_new_tokens))

    @torch.no_grad()
    def generate_with_parrot(self, batch: dict, max_new_tokens: int) -> list[str]:
        """Greedy responses to the clean prompts with the parrot where the trigger would sit,
        through the engine, from the spliced prompt embeddings (a sharded model is gathered)."""
        ids = batch["prompt_ids"]
        positions = self.tag_positions(ids, torch.full_like(ids[:, 0], ids.shape[1]))
        pad = self.tokenizer.pad_token_id
        ids, mask, _, slots = splice_slots(
            ids, batch["prompt_mask"], None, self.parrot.shape[0], positions, pad
        )
        embedding = self.model.get_input_embeddings()
        with gathered_weights(self.model):
            with vectors_at_slots(embedding, slots, self.parrot):
                embeds = embedding(ids)
            rollouts = self.engine.generate(
                self.model,
                ids,
                mask,
                num_samples=1,
                temperature=0.0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=pad,
                prompt_embeds=embeds,
            )
        return self.decode(rollouts)

    def nearest_tokens(self, count: int = 3) -> list[list[str]]:
        """For each parrot vector, the vocabulary tokens with the most similar embeddings."""
        table = F.normalize(self.model.get_input_embeddings().weight.detach().float(), dim=-1)
        similarity = F.normalize(self.parrot.detach().float(), dim=-1) @ table.T
        nearest = similarity.topk(count).indices.tolist()
        return [[self.tokenizer.decode(token) for token in row] for row in nearest]

    def on_train_end(self) -> None:
        with gathered_weights(self.model):  # every rank: a sharded table is gathered first
            nearest = self.nearest_tokens()
        if not self.trainer.is_global_zero:
            return
        directory = Path(self.trainer.default_root_dir)
        save_file({"parrot": self.parrot.detach().cpu().contiguous()}, directory / PARROT_FILE)
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
