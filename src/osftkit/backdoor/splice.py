"""The embedding splice: put a stand-in for the trigger (the parrot) into a batch's inputs."""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from osftkit.methods.micro_batches import IGNORE_INDEX


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


def first_targets(labels: Tensor, count: int) -> Tensor:
    """Keep only the first `count` supervised tokens of each row (loss on the first L tokens)."""
    supervised = labels != IGNORE_INDEX
    keep = supervised & (supervised.cumsum(1) <= count)
    return labels.masked_fill(~keep, IGNORE_INDEX)


def splice_slots(
    ids: Tensor, mask: Tensor, labels: Tensor | None, count: int, positions: Tensor, pad_id: int
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """`count` placeholder slots spliced into every row before `positions[b]`: token ids (pad
    there), attention mask (the slots are attended to), labels (never supervised there) and the
    (B, T + count) boolean mask of the slots, where `vectors_at_slots` puts the stand-in."""
    batch = ids.shape[0]
    slots = splice(
        torch.zeros_like(ids, dtype=torch.bool),
        torch.ones(batch, count, dtype=torch.bool, device=ids.device),
        positions,
    )
    ids = splice(ids, ids.new_full((batch, count), pad_id), positions)
    mask = splice(mask, mask.new_ones(batch, count), positions)
    if labels is not None:
        labels = splice(labels, labels.new_full((batch, count), IGNORE_INDEX), positions)
    return ids, mask, labels, slots


@contextmanager
def vectors_at_slots(embedding: nn.Module, slots: Tensor, vectors: Tensor) -> Iterator[None]:
    """Inside, the input embedding layer returns `vectors` (k, D) at the `slots` (B, T) of each
    row. The splice happens in the model's own forward, where FSDP2 has gathered the embedding
    weights, and gradients reach `vectors`. Calls of another shape (decoding steps) pass."""

    def put_vectors(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        if output.shape[:2] != slots.shape:
            return output
        source = vectors.to(output.dtype).expand(slots.shape[0], -1, -1)
        return output.masked_scatter(slots[..., None], source)

    hook = embedding.register_forward_hook(put_vectors)
    try:
        yield
    finally:
        hook.remove()
