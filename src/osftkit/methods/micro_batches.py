"""Micro-batches of a mini-batch: rows grouped by count or by a token budget, each cut to its
own longest row, so that a mini-batch of any size fits one forward at a time."""

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

IGNORE_INDEX = -100  # the label of a position outside the loss (prompt, padding)


def response_mask(labels: Tensor) -> Tensor:
    """Next-token positions whose label is supervised: the score mask of an SFT batch."""
    return labels[:, 1:] != IGNORE_INDEX


@dataclass
class TokenBatch:
    """Rows to score: left-padded prompt + right-padded response, and per-row tensors.

    `score_mask` (N, T - 1) marks the positions whose next token is scored. `per_row` holds
    tensors of shape (N,) or (N, T - 1) (advantages, old log-probs, loss weights); they are split
    and trimmed with the rows. `offset` is the first column of the original batch kept here.
    """

    input_ids: Tensor
    attention_mask: Tensor
    score_mask: Tensor
    per_row: dict[str, Tensor] = field(default_factory=dict)
    offset: int = 0

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def spans(self) -> tuple[Tensor, Tensor]:
        """Per row, the first and one-past-last attended column."""
        attended = self.attention_mask.bool()
        width = attended.shape[1]
        first = attended.int().argmax(dim=1)
        last = width - attended.flip(1).int().argmax(dim=1)
        return first, last

    def rows(self, index: Tensor) -> "TokenBatch":
        """The rows in `index`, cut to the columns any of them attends to."""
        first, last = self.spans()
        start, stop = int(first[index].min()), int(last[index].max())
        positions = slice(start, stop - 1)  # position t scores token t + 1

        def cut(value: Tensor) -> Tensor:
            value = value[index]
            return value[:, positions] if value.dim() == 2 else value

        return replace(
            self,
            input_ids=self.input_ids[index, start:stop],
            attention_mask=self.attention_mask[index, start:stop],
            score_mask=self.score_mask[index, positions],
            per_row={name: cut(value) for name, value in self.per_row.items()},
            offset=self.offset + start,
        )


@dataclass
class MicroBatching:
    """How one mini-batch is cut: `micro_batch_size` rows per forward, or (the alternative)
    groups of length-sorted rows whose padded size (rows x longest row) stays within
    `max_tokens_per_micro_batch`. Neither: the whole mini-batch in one forward."""

    micro_batch_size: int | None = None
    max_tokens_per_micro_batch: int | None = None

    def __post_init__(self) -> None:
        if self.micro_batch_size is not None and self.max_tokens_per_micro_batch is not None:
            raise ValueError(
                "Set micro_batch_size or max_tokens_per_micro_batch, not both (rows per forward "
                "or a token budget per forward)"
            )
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            raise ValueError(
                f"max_tokens_per_micro_batch must be >= 1, got {self.max_tokens_per_micro_batch}"
            )

    def check_fits(self, minibatch_rows: int | None, longest_row: int | None) -> None:
        """Bad settings for this data: more rows per forward than a mini-batch has, or a token
        budget below the longest row."""
        size, budget = self.micro_batch_size, self.max_tokens_per_micro_batch
        if size is not None and minibatch_rows is not None and size > minibatch_rows:
            raise ValueError(
                f"micro_batch_size={size} is larger than the mini-batch ({minibatch_rows} rows "
                f"per rank): lower it, or raise the batch size"
            )
        if budget is not None and longest_row is not None and budget < longest_row:
            raise ValueError(
                f"max_tokens_per_micro_batch={budget} is smaller than the longest row "
                f"({longest_row} tokens: prompt + response): raise it"
            )

    def groups(self, batch: TokenBatch) -> list[Tensor]:
        """Row indices of each micro-batch; every row exactly once."""
        first, last = batch.spans()
        widths = last - first
        # Longest rows first, so that trimming cuts the most and the budget packs greedily.
        order = torch.sort(widths, descending=True, stable=True).indices
        if self.max_tokens_per_micro_batch is None:
            size = self.micro_batch_size or batch.num_rows
            return list(order.split(size))
        return self.budget_groups(order, first, last)

    def budget_groups(self, order: Tensor, first: Tensor, last: Tensor) -> list[Tensor]:
        budget = self.max_tokens_per_micro_batch
        groups: list[list[int]] = []
        start = stop = 0
        for row in order.tolist():
            width = int(last[row] - first[row])
            if width > budget:
                raise ValueError(
                    f"max_tokens_per_micro_batch={budget} is smaller than a row of {width} "
                    f"tokens: raise it"
                )
            if groups:
                new_start, new_stop = min(start, int(first[row])), max(stop, int(last[row]))
                if (len(groups[-1]) + 1) * (new_stop - new_start) <= budget:
                    groups[-1].append(row)
                    start, stop = new_start, new_stop
                    continue
            groups.append([row])
            start, stop = int(first[row]), int(last[row])
        return [torch.tensor(group, dtype=torch.long) for group in groups]

    def split(self, batch: TokenBatch) -> list[tuple[Tensor, TokenBatch]]:
        """(row indices, micro-batch) pairs, each micro-batch trimmed to its own longest row."""
        device = batch.input_ids.device
        return [(index.to(device), batch.rows(index.to(device))) for index in self.groups(batch)]


def scatter_back(
    batch: TokenBatch, pieces: list[tuple[Tensor, TokenBatch]], values: list[Tensor]
) -> Tensor:
    """Per-position values (n, t - 1) of each micro-batch -> one (N, T - 1) tensor of the batch."""
    out = torch.zeros(batch.score_mask.shape, dtype=values[0].dtype, device=values[0].device)
    for (rows, part), value in zip(pieces, values, strict=True):
        start = part.offset - batch.offset
        out[rows[:, None], torch.arange(start, start + value.shape[1], device=out.device)] = value
    return out
