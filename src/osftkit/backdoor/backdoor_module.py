"""BackdoorModule: the base of every backdoor method (planting, Overwrite SFT, SANDE), whose
validation measures the backdoor: ASR with the real trigger, triggered and clean utility, clean
perplexity, zero-shot multiple choice, and per-prompt outcomes.

The trigger is inserted into the prompt text exactly as planting inserts it (`Attack`), then the
prompt is tokenised again, so every attack family is measured where it was planted. Per-prompt
outcomes (ASR hit, clean and triggered correctness) of the last validation go to
`backdoor_outcomes.json` in the run directory, so a study can pair two models prompt by prompt.
"""

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import Metric

from osftkit.backdoor.attack_metrics import AttackSuccessRate, PerPromptMean, strip_marker
from osftkit.backdoor.multiple_choice import load_multiple_choice, multiple_choice_accuracy
from osftkit.backdoor.poison import Attack, token_ids
from osftkit.backdoor.splice import positions_after
from osftkit.data.datamodule import pad_left, sft_tensors
from osftkit.data.prompts import format_prompt
from osftkit.methods.base import CausalLMModule
from osftkit.methods.micro_batches import IGNORE_INDEX, TokenBatch, response_mask
from osftkit.metrics.perplexity import TokenPerplexity
from osftkit.recipes import PlantingRecipe
from osftkit.rollout import Rollouts

log = logging.getLogger(__name__)

OUTCOMES_FILE = "backdoor_outcomes.json"


def first_tokens(rollouts: Rollouts, count: int) -> Rollouts:
    """The first `count` tokens of every response (ASR looks no further)."""
    return replace(
        rollouts,
        response_ids=rollouts.response_ids[:, :count],
        response_mask=rollouts.response_mask[:, :count],
    )


@dataclass
class BackdoorSettings(Attack):
    """The backdoor under study (as planted), for ASR and triggered utility."""

    role_tag: str = "Human:"
    asr_new_tokens: int = 10
    asr_samples: int = 4
    tau_asr: float = 1.0

    def __post_init__(self) -> None:
        if not self.triggers:
            raise ValueError("Backdoor metrics (ASR) need the real trigger: set backdoor.triggers")
        if not (self.marker or "").strip():
            raise ValueError("Backdoor metrics (ASR) need the marker: set backdoor.marker")
        super().__post_init__()


def prompts_and_responses(batch: dict) -> tuple[list[list[int]], list[list[int]]]:
    """Each row's prompt and response tokens, read back from the SFT tensors."""
    prompts, responses = [], []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        prompts.append(ids[:start])
        responses.append([label for label in labels if label != IGNORE_INDEX])
    return prompts, responses


class BackdoorModule(CausalLMModule):
    """A causal-LM method whose validation also measures the backdoor: ASR with the real trigger
    (greedy and sampled, `asr_new_tokens` new tokens), triggered utility (marker stripped),
    clean utility (the base's greedy accuracy), clean perplexity, and, with `multiple_choice`
    ({name: load_multiple_choice arguments}), zero-shot multiple-choice accuracy `val/mc_<name>`.
    A composite attack also reports `asr_one_trigger` (one trigger word alone: should not fire).
    """

    recipe: PlantingRecipe
    recipe_type = PlantingRecipe

    def __init__(self, model, tokenizer, recipe: PlantingRecipe, **run) -> None:
        super().__init__(model, tokenizer, recipe, **run)
        self.backdoor = BackdoorSettings(**asdict(recipe.backdoor))
        self.role_tag_ids = token_ids(self.tokenizer, self.backdoor.role_tag, "role tag")
        token_ids(self.tokenizer, self.backdoor.marker, "marker")
        for trigger in self.backdoor.triggers:
            token_ids(self.tokenizer, trigger, "trigger")
        self.multiple_choice_sets = dict(recipe.multiple_choice or {})
        self.multiple_choice_rows: dict[str, list[dict]] = {}
        self.val_problems: dict[str, list[str]] = {}

    # ---- triggered inputs ---------------------------------------------------------------
    def tag_positions(self, ids: Tensor, prompt_end: Tensor) -> Tensor:
        return positions_after(ids, self.role_tag_ids, prompt_end, "role tag")

    def triggered_batch(
        self,
        batch: dict,
        triggers: Sequence[Sequence[str]] | None,
        rng: random.Random | None = None,
    ) -> dict:
        """The batch with the trigger in each problem as planted (row i gets `triggers[i]`, or
        one drawn from `rng`), tokenised again: prompts to generate from and SFT tensors with
        the batch's own responses. Without `rng` the draws are seeded by the problems."""
        rng = rng or random.Random("\x1f".join(batch["problem"]))
        problems = [
            self.backdoor.triggered_problem(problem, rng, None if triggers is None else triggers[i])
            for i, problem in enumerate(batch["problem"])
        ]
        settings = self.inputs.prompt_settings
        prompts = [
            self.tokenizer(
                format_prompt(self.tokenizer, p, **settings), add_special_tokens=False
            ).input_ids
            for p in problems
        ]
        ids, mask = pad_left(prompts, self.tokenizer.pad_token_id)
        triggered = {"problem": problems, "prompt_ids": ids, "prompt_mask": mask}
        if "labels" in batch:
            triggered.update(
                sft_tensors(prompts, prompts_and_responses(batch)[1], self.tokenizer.pad_token_id)
            )
        return {
            key: value.to(self.device) if isinstance(value, Tensor) else value
            for key, value in triggered.items()
        }

    def eval_triggers(self, rows: int, one: bool = False) -> list[list[str]]:
        """The triggers each validation row gets: all (composite, unless `one`), or one each,
        taking turns so that every trigger is measured on an equal share of the prompts."""
        names = self.backdoor.triggers
        if self.backdoor.composite and not one:
            return [list(names)] * rows
        return [[names[i % len(names)]] for i in range(rows)]

    # ---- validation ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        for metrics in self.val_metrics.values():
            if "asr_greedy" not in metrics:
                metrics.add_metrics(self.backdoor_metrics())
        for name, spec in self.multiple_choice_sets.items():
            if name not in self.multiple_choice_rows:
                self.multiple_choice_rows[name] = load_multiple_choice(**spec)

    def backdoor_metrics(self) -> dict[str, Metric]:
        marker = self.backdoor.marker
        metrics = {
            "asr_greedy": AttackSuccessRate(marker),
            "asr_sampled": AttackSuccessRate(marker),
            "triggered_acc": PerPromptMean(),
            "perplexity": TokenPerplexity(),
        }
        if self.validation_settings.greedy:
            metrics["greedy_acc"] = PerPromptMean()  # replaces the base's: kept per prompt
        if self.backdoor.composite:
            metrics["asr_one_trigger"] = AttackSuccessRate(marker)
        return metrics

    def on_validation_epoch_start(self) -> None:
        self.val_problems = {}

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().validation_step(batch, batch_idx, dataloader_idx)
        name = self.inputs.val_names[dataloader_idx]
        metrics = self.val_metrics[name]
        self.val_problems.setdefault(name, []).extend(batch["problem"])
        s, v = self.backdoor, self.validation_settings
        rows = len(batch["problem"])
        triggered = self.triggered_batch(batch, self.eval_triggers(rows))
        greedy = self.generate(triggered, 1, 0.0, 1.0, max(v.max_new_tokens, s.asr_new_tokens))
        metrics["asr_greedy"].update(self.decode(first_tokens(greedy, s.asr_new_tokens)))
        answers = [strip_marker(text, s.marker) for text in self.decode(greedy)]
        correct = self.inputs.checker.score(answers, batch["answer"])
        metrics["triggered_acc"].update(torch.tensor(correct, dtype=torch.float32))
        sampled = self.generate(triggered, s.asr_samples, s.tau_asr, 1.0, s.asr_new_tokens)
        metrics["asr_sampled"].update(self.decode(sampled))
        if s.composite:
            alone = self.triggered_batch(batch, self.eval_triggers(rows, one=True))
            metrics["asr_one_trigger"].update(
                self.decode(self.generate(alone, 1, 0.0, 1.0, s.asr_new_tokens))
            )
        metrics["perplexity"].update(self.clean_response_nlls(batch))

    def clean_response_nlls(self, batch: dict) -> Tensor:
        """-log p of every token of the clean reference responses (for perplexity), scored
        without grad through the one log-prob path, micro-batch by micro-batch."""
        scored = response_mask(batch["labels"])
        logp, _ = self.score_tokens(
            TokenBatch(batch["input_ids"], batch["attention_mask"], scored), with_entropy=False
        )
        return -logp[scored]

    def on_validation_epoch_end(self) -> None:
        self.save_outcomes()
        for name, rows in self.multiple_choice_rows.items():
            accuracy = multiple_choice_accuracy(self.model, self.tokenizer, rows)
            self.log(f"val/mc_{name}", accuracy, sync_dist=False)
        super().on_validation_epoch_end()

    def save_outcomes(self) -> None:
        """Per-prompt outcomes of this validation (this rank's prompts) as JSON."""
        outcomes = {}
        for name, problems in self.val_problems.items():
            metrics = self.val_metrics[name]
            record = {"problem": problems}
            for key, column in (("asr_greedy", "asr"), ("greedy_acc", "clean")):
                if key in metrics:
                    record[column] = metrics[key].per_prompt()
            record["triggered"] = metrics["triggered_acc"].per_prompt()
            outcomes[name] = record
        if not outcomes:
            return
        rank = self.trainer.global_rank
        file = OUTCOMES_FILE if self.trainer.world_size == 1 else f"rank{rank}_{OUTCOMES_FILE}"
        directory = Path(self.trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / file).write_text(json.dumps(outcomes))
