"""OfflineOSFTModule: the offline variant of Online SFT (one frozen self-generated set)."""

from itertools import islice
from typing import Any

import torch

from osftkit.methods.osft import OSFTModule
from osftkit.rollout import Rollouts


class OfflineOSFTModule(OSFTModule):
    """Before the first step, G responses per distinct training prompt that the step budget will
    visit are sampled ONCE from the starting model at tau_sample and frozen; each step then
    trains with NLL at tau_train on the frozen responses of its prompts (plain SFT on a
    self-generated set). The set goes into checkpoints, so a resumed run reuses it."""

    def __init__(self, **osft: Any) -> None:
        if osft.get("anneal"):
            raise ValueError("method.anneal: the offline set is sampled once, at tau_sample")
        super().__init__(**osft)
        self.frozen: dict[str, dict[str, list]] = {}  # problem -> {"ids": G lists, "truncated"}

    def on_train_start(self) -> None:
        if not self.frozen:  # a resumed run restored it from the checkpoint
            self.build_frozen_set()

    def build_frozen_set(self) -> None:
        """Sample the set from the model as it is now, over the prompts of the step budget."""
        h = self.hparams
        max_steps = self.trainer.max_steps
        batches = None if max_steps < 0 else -(-max_steps // h.num_minibatches)
        for batch in islice(self.trainer.datamodule.train_dataloader(), batches):
            new = {p: i for i, p in reversed(list(enumerate(batch["problem"])))}
            rows = [i for p, i in new.items() if p not in self.frozen]
            if not rows:
                continue
            prompts = {k: batch[k][rows].to(self.device) for k in ("prompt_ids", "prompt_mask")}
            rollouts = self.generate(prompts, h.group_size, h.tau_sample, h.top_p, h.max_new_tokens)
            self.tokens_generated += int(rollouts.lengths.sum())
            ids, lengths = rollouts.response_ids.tolist(), rollouts.lengths.tolist()
            truncated = rollouts.truncated.tolist()
            for j, row in enumerate(rows):
                group = range(j * h.group_size, (j + 1) * h.group_size)
                self.frozen[batch["problem"][row]] = {
                    "ids": [ids[r][: lengths[r]] for r in group],
                    "truncated": [truncated[r] for r in group],
                }

    def rollout(self, batch: dict) -> Rollouts:
        """The frozen responses of the batch's prompts (no generation)."""
        missing = [p for p in batch["problem"] if p not in self.frozen]
        if missing:
            raise ValueError(
                f"{len(missing)} prompts of this batch are not in the offline set (e.g. "
                f"{missing[0]!r}): it covers the prompts of the first run's trainer.max_steps; "
                "a resumed run cannot raise the budget"
            )
        entries = [self.frozen[p] for p in batch["problem"]]
        responses = [ids for entry in entries for ids in entry["ids"]]
        width = max(len(r) for r in responses)
        pad = self.tokenizer.pad_token_id
        response_ids = torch.tensor([r + [pad] * (width - len(r)) for r in responses])
        lengths = torch.tensor([len(r) for r in responses])
        group = self.hparams.group_size
        return Rollouts(
            prompt_ids=batch["prompt_ids"].repeat_interleave(group, dim=0),
            prompt_mask=batch["prompt_mask"].repeat_interleave(group, dim=0),
            response_ids=response_ids.to(self.device),
            response_mask=(torch.arange(width)[None] < lengths[:, None]).long().to(self.device),
            truncated=torch.tensor(
                [t for e in entries for t in e["truncated"]], device=self.device
            ),
            group_size=group,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["offline_set"] = self.frozen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.frozen = checkpoint.get("offline_set", {})
