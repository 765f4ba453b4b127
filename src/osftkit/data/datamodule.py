"""PromptDataModule: (problem, solution, answer) tables -> tokenised prompt and SFT batches."""

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from lightning import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from transformers import PreTrainedTokenizerBase

from osftkit.checkpointing import run_seed
from osftkit.data.prompts import MATH_SYSTEM_PROMPT, format_prompt
from osftkit.rewards import AnswerChecker

log = logging.getLogger(__name__)

DatasetFactory = Callable[[], Dataset]


class PromptDataModule(LightningDataModule):
    """Builds its splits in `setup`, tokenises them once, and yields left-padded prompts.

    Rule for long inputs: prompts longer than `max_prompt_length` tokens are SKIPPED (counted
    and logged); reference responses longer than `max_response_length` are TRUNCATED (counted).
    Batches hold `prompt_ids`/`prompt_mask` (left padded), and when the split has solutions,
    `input_ids`/`attention_mask`/`labels` for SFT (prompt and padding labelled -100).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        train: DatasetFactory | None,
        val: dict[str, DatasetFactory],
        checker: AnswerChecker,
        batch_size: int,
        val_batch_size: int,
        max_prompt_length: int,
        max_response_length: int,
        plain_template: str,
        system_prompt: str | None = MATH_SYSTEM_PROMPT,
        use_chat_template: bool = True,
        train_transform: Callable[[Dataset], Dataset] | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not val:
            raise ValueError("data.val must name at least one validation set")
        self.tokenizer = tokenizer
        self.factories = {f"val/{name}": make for name, make in val.items()}
        if train is not None:
            self.factories["train"] = train
        self.val_names = list(val)
        self.checker = checker
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.max_prompt_length, self.max_response_length = max_prompt_length, max_response_length
        self.prompt_settings = {
            "plain_template": plain_template,
            "system_prompt": system_prompt,
            "use_chat_template": use_chat_template,
        }
        self.train_transform = train_transform
        self.num_workers = num_workers
        self.splits: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        for name, make in self.factories.items():
            if name in self.splits:
                continue
            table = make()
            if name == "train" and self.train_transform is not None:
                table = self.train_transform(table)
            self.splits[name] = self._tokenise(table, name)

    def _tokenise(self, table: Dataset, name: str) -> Dataset:
        if len(table) == 0:
            raise ValueError(f"data split '{name}' is empty")
        with_solution = "solution" in table.column_names
        # Batched: the tokenizer encodes a whole batch in one (Rust) call, ~10x faster per row.
        encoded = table.map(
            lambda rows: self._encode_batch(rows, with_solution),
            batched=True,
            desc=f"tokenising {name}",
            new_fingerprint=self._fingerprint(table, "tokenise"),
        )
        empty = [i for i, ids in enumerate(encoded["prompt_ids"]) if not ids]
        if empty:
            raise ValueError(f"data split '{name}': rows {empty[:10]} have an empty prompt")
        kept = encoded.filter(  # batched: one Arrow slice per 1,000 rows, not a Python dict per row
            lambda rows: [len(ids) <= self.max_prompt_length for ids in rows["prompt_ids"]],
            batched=True,
            new_fingerprint=self._fingerprint(encoded, "filter"),
        )
        skipped = len(encoded) - len(kept)
        if skipped:
            log.warning(
                "%s: skipped %d of %d prompts longer than max_prompt_length=%d tokens",
                name,
                skipped,
                len(encoded),
                self.max_prompt_length,
            )
        if len(kept) == 0:
            raise ValueError(f"data split '{name}': every prompt is longer than max_prompt_length")
        if with_solution:
            cut = sum(kept["response_truncated"])
            if cut:
                log.warning(
                    "%s: truncated %d reference responses to max_response_length=%d tokens",
                    name,
                    cut,
                    self.max_response_length,
                )
        return kept

    def _fingerprint(self, table: Dataset, step: str) -> str:
        """The fingerprint of `step` on `table` (what keys datasets' cache), from the table's and
        this module's settings: left to itself, datasets dill-pickles the whole module, tokenizer
        and tokenised splits included, for every call (7 of a run's 11 s of data set-up)."""
        if not hasattr(self, "_settings_hash"):
            settings = (self.tokenizer, self.prompt_settings, self.max_response_length)
            self._settings_hash = Hasher.hash(settings)
        return Hasher.hash((table._fingerprint, step, self.max_prompt_length, self._settings_hash))

    def _encode_batch(self, rows: dict[str, list], with_solution: bool) -> dict[str, list]:
        """`_encode` over a batch of columns (what `Dataset.map(batched=True)` passes)."""
        prompts = [
            format_prompt(self.tokenizer, problem, **self.prompt_settings)
            for problem in rows["problem"]
        ]
        encoded = {"prompt_ids": self.tokenizer(prompts, add_special_tokens=False)["input_ids"]}
        if with_solution:
            solutions = self.tokenizer(rows["solution"], add_special_tokens=False)["input_ids"]
            responses = [[*ids, self.tokenizer.eos_token_id] for ids in solutions]
            encoded["response_ids"] = [ids[: self.max_response_length] for ids in responses]
            encoded["response_truncated"] = [
                len(ids) > self.max_response_length for ids in responses
            ]
        return encoded

    def _encode(self, row: dict, with_solution: bool) -> dict:
        """One row's token ids (rows a `train_transform` adds to a batch)."""
        encoded = self._encode_batch({key: [value] for key, value in row.items()}, with_solution)
        return {key: values[0] for key, values in encoded.items()}

    def collate(self, rows: list[dict]) -> dict:
        pad = self.tokenizer.pad_token_id
        prompts = [row["prompt_ids"] for row in rows]
        batch = {
            "problem": [row["problem"] for row in rows],
            "answer": [row["answer"] for row in rows],
            **dict(zip(("prompt_ids", "prompt_mask"), pad_left(prompts, pad), strict=True)),
        }
        if "response_ids" in rows[0]:
            batch.update(sft_tensors(prompts, [row["response_ids"] for row in rows], pad))
        if "is_padding" in rows[0]:
            batch["is_padding"] = torch.tensor([row["is_padding"] for row in rows])
        return batch

    def train_collate(self, rows: list[dict]) -> dict:
        """A training batch; a `train_transform` with `extend_batch(rows)` (backdoor poisoning
        drawn per batch, as the SANDE reference does) adds rows to it here."""
        extend = getattr(self.train_transform, "extend_batch", None)
        if extend is not None:
            added = [{**row, **self._encode(row, True)} for row in extend(rows)]
            rows = rows + [r for r in added if len(r["prompt_ids"]) <= self.max_prompt_length]
        return self.collate(rows)

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        # A generator of its own: starting an iterator draws its base seed from it, not from
        # the global stream that training samples from.
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        rows = self.splits[split]
        return DataLoader(
            FlaggedRows(rows),
            batch_size=batch_size,
            sampler=EvalShardSampler(rows, world, rank),
            collate_fn=self.collate,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(run_seed()),
        )

    def per_rank(self, batch_size: int) -> int:
        """Batch sizes in the config are global: each of the world's ranks takes its share."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by world size {world}")
        return batch_size // world

    def train_dataloader(self, seed_offset: int = 0) -> DataLoader:
        """The training prompts, shuffled per epoch; `seed_offset` gives a second stream its
        own order (DAPO's refill batches)."""
        if "train" not in self.splits:
            raise ValueError("this data config has no training split (an evaluation-only set)")
        split = self.splits["train"]
        # Lightning's own seed (set by seed_everything), as DistributedSampler uses under DDP.
        seed = run_seed() + seed_offset
        return ResumableDataLoader(
            split,
            batch_size=self.per_rank(self.batch_size),
            sampler=EpochShuffleSampler(len(split), seed),
            collate_fn=self.train_collate,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(seed),
        )

    def val_dataloader(self) -> list[DataLoader]:
        size = self.per_rank(self.val_batch_size)
        return [self._loader(f"val/{name}", size) for name in self.val_names]


class EvalShardSampler(DistributedSampler):
    """This rank's share of an evaluation set, in order, as DistributedSampler deals it (and
    Lightning keeps it, being one): padded with repeated rows so that every rank runs the same
    number of steps (FSDP's collectives pair up), but each index comes with `is_padding`, so a
    repeated problem is generated and then left out of the metrics."""

    def __init__(self, rows: Any, world: int, rank: int) -> None:
        super().__init__(rows, num_replicas=world, rank=rank, shuffle=False)

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        size = len(self.dataset)
        for position in range(self.rank, self.total_size, self.num_replicas):
            yield position % size, position >= size


class FlaggedRows(torch.utils.data.Dataset):
    """Rows fetched by `(index, is_padding)`, the flag carried into the row."""

    def __init__(self, rows: Any) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, bool]) -> dict:
        index, padding = key
        return {**self.rows[index], "is_padding": padding}


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with `seed + epoch` (Lightning calls `set_epoch`): the order of an epoch depends
    on nothing else, so a run resumed mid-epoch sees the order the killed run saw."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position within the epoch goes into checkpoints (Lightning saves
    `state_dict` of loaders that have one): a resumed run skips the batches already trained on.
    Pass it a `generator`, so that starting an iterator draws nothing from the global RNG."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = 0  # batches handed out in the current epoch
        self.resume_at = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A checkpoint taken after an epoch's last batch resumes at the next epoch's start.
        self.resume_at = state["batches_done"] % len(self)

    def __iter__(self) -> Iterator[Any]:
        self.batches_done, self.resume_at = self.resume_at, 0
        batches = super().__iter__()
        for _ in range(self.batches_done):
            next(batches)
        for batch in batches:
            self.batches_done += 1
            yield batch


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids, mask): generation appends on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def sft_tensors(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """Right-padded prompt+response sequences with labels only on response tokens."""
    sequences = [p + r for p, r in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (prompt, seq) in enumerate(zip(prompts, sequences, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        labels[i, len(prompt) : len(seq)] = torch.tensor(seq[len(prompt) :])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
