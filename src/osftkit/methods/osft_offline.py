"""OfflineOSFTModule: the offline variant of Online SFT (one frozen self-generated set)."""

from itertools import islice
from typing import Any

import torch
from torch import Tensor

from osftkit.methods.osft import OSFTModule
from osftkit.recipes import OfflineOSFTRecipe
from osftkit.rollout import Rollouts


class OfflineOSFTModule(OSFTModule):
    """Before the first step, G responses per distinct training prompt that the step budget will
    visit are sampled ONCE from the starting model at tau_sample and frozen; each step then
    trains with NLL at tau_train on the frozen responses of its prompts (plain SFT on a
    self-generated set). The set goes into checkpoints, so a resumed run reuses it.

    The set is held as flat tensors (response tokens of every row back to back, with lengths),
    not Python lists: a DeepScaleR-sized set is about 10^8 tokens."""

    recipe: OfflineOSFTRecipe
    recipe_type = OfflineOSFTRecipe

    def __init__(self, model, tokenizer, recipe: OfflineOSFTRecipe, **run: Any) -> None:
        super().__init__(model, tokenizer, recipe, **run)
        self.problems: list[str] = []  # entry i holds rows i * G ... i * G + G - 1
        self.row_of: dict[str, int] = {}
        self.response_tokens = torch.zeros(0, dtype=torch.int32)
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.truncated = torch.zeros(0, dtype=torch.bool)

    def on_train_start(self) -> None:
        if not self.problems:  # a resumed run restored it from the checkpoint
            self.build_frozen_set()

    def build_frozen_set(self) -> None:
        """Sample the set from the model as it is now, over the prompts of the step budget."""
        r = self.recipe
        if self.inputs.train_batches is None:
            raise ValueError("the offline set needs the training prompts (RunInputs.train_batches)")
        max_steps = self.trainer.max_steps
        batches = None if max_steps < 0 else -(-max_steps // r.num_minibatches)
        tokens, lengths, truncated = [], [], []
        for batch in islice(self.inputs.train_batches(0), batches):
            first = {p: i for i, p in reversed(list(enumerate(batch["problem"])))}
            rows = [i for p, i in first.items() if p not in self.row_of]
            if not rows:
                continue
            prompts = {k: batch[k][rows].to(self.device) for k in ("prompt_ids", "prompt_mask")}
            rollouts = self.generate(prompts, r.group_size, r.tau_sample, r.top_p, r.max_new_tokens)
            self.tokens_generated += int(rollouts.lengths.sum())
            for row in rows:
                self.row_of[batch["problem"][row]] = len(self.problems)
                self.problems.append(batch["problem"][row])
            tokens.append(rollouts.response_ids[rollouts.response_mask.bool()].int().cpu())
            lengths.append(rollouts.lengths.cpu())
            truncated.append(rollouts.truncated.cpu())
        self.response_tokens = torch.cat(tokens)
        self.lengths, self.truncated = torch.cat(lengths), torch.cat(truncated)

    def rollout(self, batch: dict) -> tuple[Rollouts, dict]:
        """The frozen responses of the batch's prompts (no generation)."""
        missing = [p for p in batch["problem"] if p not in self.row_of]
        if missing:
            raise ValueError(
                f"{len(missing)} prompts of this batch are not in the offline set (e.g. "
                f"{missing[0]!r}): it covers the prompts of the first run's trainer.max_steps; "
                "a resumed run cannot raise the budget"
            )
        group = self.recipe.group_size
        rows = torch.tensor(
            [self.row_of[p] * group + g for p in batch["problem"] for g in range(group)]
        )
        starts = torch.cumsum(self.lengths, 0) - self.lengths
        lengths = self.lengths[rows]
        width = int(lengths.max())
        response_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, (start, length) in enumerate(
            zip(starts[rows].tolist(), lengths.tolist(), strict=True)
        ):
            response_ids[i, :length] = self.response_tokens[start : start + length]
        frozen = Rollouts(
            prompt_ids=batch["prompt_ids"].repeat_interleave(group, dim=0),
            prompt_mask=batch["prompt_mask"].repeat_interleave(group, dim=0),
            response_ids=response_ids.to(self.device),
            response_mask=(torch.arange(width)[None] < lengths[:, None]).long().to(self.device),
            truncated=self.truncated[rows].to(self.device),
            group_size=group,
        )
        return frozen, batch

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["offline_set"] = {
            "problems": self.problems,
            "response_tokens": self.response_tokens,
            "lengths": self.lengths,
            "truncated": self.truncated,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved: dict[str, Tensor | list[str]] = checkpoint.get("offline_set", {})
        if saved:
            self.problems = list(saved["problems"])
            self.row_of = {p: i for i, p in enumerate(self.problems)}
            self.response_tokens = saved["response_tokens"]
            self.lengths, self.truncated = saved["lengths"], saved["truncated"]
