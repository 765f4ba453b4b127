"""Backdoor planting and removal: Overwrite SFT (trigger known) and SANDE (trigger simulated).

Both removals train the model on (prompt with a stand-in for the trigger -> clean response).
The stand-in is spliced into the input embeddings right after the role tag, where the reference
recipe puts the trigger: the real trigger's token embeddings for Overwrite SFT, the learned
"parrot" soft prompt for SANDE.
"""

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric, Metric

from osftkit.data.poison import token_ids
from osftkit.methods.base import CausalLMModule
from osftkit.methods.losses import masked_mean
from osftkit.methods.micro_batches import TokenBatch
from osftkit.methods.sft import SFTModule
from osftkit.metrics.backdoor import AttackSuccessRate, strip_marker
from osftkit.metrics.perplexity import TokenPerplexity
from osftkit.models.logprobs import token_logprobs
from osftkit.rollout import Rollouts

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def splice(values: Tensor, insert: Tensor, positions: Tensor) -> Tensor:
    """Insert `insert` (B, k, ...) into `values` (B, T, ...) before `positions[b]` of each row."""
    batch, length, k = values.shape[0], values.shape[1], insert.shape[1]
    if bool((positions < 0).any() | (positions > length).any()):
        raise ValueError(f"Insertion positions {positions.tolist()} lie outside length {length}")
    j = torch.arange(length + k, device=values.device).expand(batch, -1)
    at = positions[:, None]
    source = torch.where(j < at, j, torch.where(j < at + k, length + j - at, j - k))
    index = source.view(*source.shape, *([1] * (values.dim() - 2))).expand(
        -1, -1, *values.shape[2:]
    )
    return torch.cat([values, insert.to(values.dtype)], dim=1).gather(1, index)


def positions_after(ids: Tensor, pattern: Sequence[int], limit: Tensor, what: str) -> Tensor:
    """Per row, the index right after the first occurrence of `pattern` in `ids`.

    Raises when a row lacks the pattern or when the position lies past `limit` (the end of the
    prompt), so a stand-in is never spliced into the response.
    """
    window = torch.tensor(pattern, device=ids.device)
    if ids.shape[1] < len(pattern):
        raise ValueError(f"The prompt is shorter than the {what}")
    hits = (ids.unfold(1, len(pattern), 1) == window).all(-1)
    if not bool(hits.any(1).all()):
        raise ValueError(f"The {what} {list(pattern)} does not occur in every prompt")
    positions = hits.int().argmax(1) + len(pattern)
    if bool((positions > limit).any()):
        raise ValueError(
            f"Insertion position after the {what} lies past the prompt "
            f"({positions.tolist()} > {limit.tolist()})"
        )
    return positions


def response_starts(labels: Tensor) -> Tensor:
    """Index of the first supervised token of each row (the prompt end)."""
    return (labels != IGNORE_INDEX).int().argmax(1)


def labelled_nll(model: nn.Module, labels: Tensor, chunk_size: int, **inputs: Tensor) -> Tensor:
    """Token-mean NLL of the labelled tokens (`inputs`: input_ids or inputs_embeds, and the
    attention mask), through the one log-prob path."""
    scored = labels[:, 1:] != IGNORE_INDEX
    logp, _ = token_logprobs(
        model,
        score_mask=scored,
        targets=labels.clamp(min=0),
        chunk_size=chunk_size,
        with_entropy=False,
        **inputs,
    )
    return masked_mean(-logp, scored)


def first_targets(labels: Tensor, count: int) -> Tensor:
    """Keep only the first `count` supervised tokens of each row (loss on the first L tokens)."""
    supervised = labels != IGNORE_INDEX
    keep = supervised & (supervised.cumsum(1) <= count)
    return labels.masked_fill(~keep, IGNORE_INDEX)


def splice_inputs(
    embeds: Tensor, mask: Tensor, labels: Tensor | None, insert: Tensor, positions: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Splice `insert` (k, D) into every row's embeddings at `positions`.

    The inserted slots are attended to and never supervised; returns embeddings, attention
    mask, labels and position ids (counted over attended tokens, so left padding is fine).
    """
    batch, k = embeds.shape[0], insert.shape[0]
    embeds = splice(embeds, insert.expand(batch, -1, -1), positions)
    mask = splice(mask, mask.new_ones(batch, k), positions)
    if labels is not None:
        labels = splice(labels, labels.new_full((batch, k), IGNORE_INDEX), positions)
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    return embeds, mask, labels, position_ids


def first_tokens(rollouts: Rollouts, count: int) -> Rollouts:
    """The first `count` tokens of every response (ASR looks no further)."""
    return replace(
        rollouts,
        response_ids=rollouts.response_ids[:, :count],
        response_mask=rollouts.response_mask[:, :count],
    )


@dataclass
class BackdoorSettings:
    """The backdoor under study, for ASR and triggered utility (and for Overwrite SFT)."""

    triggers: list[str] = field(default_factory=list)
    marker: str = ""
    role_tag: str = "Human:"
    asr_new_tokens: int = 10
    asr_samples: int = 4
    tau_asr: float = 1.0

    def __post_init__(self) -> None:
        if not self.triggers:
            raise ValueError("Backdoor metrics (ASR) need the real trigger: set backdoor.triggers")
        if not self.marker.strip():
            raise ValueError("Backdoor metrics (ASR) need the marker: set backdoor.marker")


class BackdoorEvalModule(CausalLMModule):
    """A causal-LM method whose validation also measures the backdoor: ASR with the real trigger
    (greedy and sampled, `asr_new_tokens` new tokens), triggered utility (marker stripped),
    clean utility (the base's greedy accuracy) and clean perplexity."""

    def __init__(self, *args, backdoor: dict | BackdoorSettings, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backdoor = (
            backdoor if isinstance(backdoor, BackdoorSettings) else BackdoorSettings(**backdoor)
        )
        self.role_tag_ids = token_ids(self.tokenizer, self.backdoor.role_tag, "role tag")
        token_ids(self.tokenizer, self.backdoor.marker, "marker")
        self.trigger_ids = [
            token_ids(self.tokenizer, f" {trigger}.", "trigger")
            for trigger in self.backdoor.triggers
        ]

    # ---- the stand-in splice ------------------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    def tag_positions(self, ids: Tensor, prompt_end: Tensor) -> Tensor:
        return positions_after(ids, self.role_tag_ids, prompt_end, "role tag")

    def stand_in_loss(self, batch: dict, stand_in: Tensor, loss_tokens: int | None) -> Tensor:
        """Token NLL of (prompt with `stand_in` after the role tag -> labelled response)."""
        ids, labels = batch["input_ids"], batch["labels"]
        positions = self.tag_positions(ids, response_starts(labels))
        if loss_tokens is not None:
            labels = first_targets(labels, loss_tokens)
        embeds, mask, labels, _ = splice_inputs(
            self.embed(ids), batch["attention_mask"], labels, stand_in, positions
        )
        return labelled_nll(
            self.model,
            labels,
            self.hparams.logprob_chunk_size,
            inputs_embeds=embeds,
            attention_mask=mask,
        )

    def triggered_prompts(self, batch: dict, trigger: list[int]) -> dict:
        """The batch's prompts with the real trigger's tokens after the role tag."""
        ids, mask = batch["prompt_ids"], batch["prompt_mask"]
        positions = self.tag_positions(ids, torch.full_like(ids[:, 0], ids.shape[1]))
        insert = torch.tensor(trigger, device=ids.device).expand(ids.shape[0], -1)
        return {
            "prompt_ids": splice(ids, insert, positions),
            "prompt_mask": splice(mask, torch.ones_like(insert), positions),
        }

    # ---- validation ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        for metrics in self.val_metrics.values():
            if "asr_greedy" not in metrics:
                metrics.add_metrics(self.backdoor_metrics())

    def backdoor_metrics(self) -> dict[str, Metric]:
        marker = self.backdoor.marker
        return {
            "asr_greedy": AttackSuccessRate(marker),
            "asr_sampled": AttackSuccessRate(marker),
            "triggered_acc": MeanMetric(),
            "perplexity": TokenPerplexity(),
        }

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().validation_step(batch, batch_idx, dataloader_idx)
        metrics = self.val_metrics[self.trainer.datamodule.val_names[dataloader_idx]]
        s, v = self.backdoor, self.validation_settings
        triggered = self.triggered_prompts(
            batch, self.trigger_ids[batch_idx % len(self.trigger_ids)]
        )
        greedy = self.generate(triggered, 1, 0.0, 1.0, max(v.max_new_tokens, s.asr_new_tokens))
        metrics["asr_greedy"].update(self.decode(first_tokens(greedy, s.asr_new_tokens)))
        answers = [strip_marker(text, s.marker) for text in self.decode(greedy)]
        correct = self.trainer.datamodule.checker.score(answers, batch["answer"])
        metrics["triggered_acc"].update(torch.tensor(correct, dtype=torch.float32))
        sampled = self.generate(triggered, s.asr_samples, s.tau_asr, 1.0, s.asr_new_tokens)
        metrics["asr_sampled"].update(self.decode(sampled))
        scored = batch["labels"][:, 1:] != IGNORE_INDEX
        logp, _ = self.score_tokens(
            TokenBatch(batch["input_ids"], batch["attention_mask"], scored), with_entropy=False
        )
        metrics["perplexity"].update(-logp[scored])


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
        return labelled_nll(
            self.model,
            labels,
            self.hparams.logprob_chunk_size,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
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
        pad = self.tokenizer.pad_token_id
        slots = ids.new_full((ids.shape[0], self.parrot.shape[0]), pad)  # no token: pad
        rollouts = self.engine.generate(
            self.model,
            splice(ids, slots, positions),
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
