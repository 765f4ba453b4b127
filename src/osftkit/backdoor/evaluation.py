"""Backdoor evaluation shared by every backdoor method: ASR with the real trigger, triggered
and clean utility, clean perplexity."""

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, Metric
from torchmetrics.text import Perplexity

from osftkit.backdoor.metrics import AttackSuccessRate, strip_marker
from osftkit.backdoor.poison import token_ids
from osftkit.backdoor.splice import (
    IGNORE_INDEX,
    first_targets,
    positions_after,
    response_starts,
    splice,
    splice_inputs,
)
from osftkit.methods.base import CausalLMModule
from osftkit.methods.losses import position_ids_from_mask
from osftkit.rollout import Rollouts


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
        embeds, mask, labels, position_ids = splice_inputs(
            self.embed(ids), batch["attention_mask"], labels, stand_in, positions
        )
        logits = self.model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).logits
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
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
            "perplexity": Perplexity(ignore_index=IGNORE_INDEX),
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
        with torch.no_grad():
            logits = self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=position_ids_from_mask(batch["attention_mask"]),
            ).logits
        metrics["perplexity"].update(logits[:, :-1].float(), batch["labels"][:, 1:])

