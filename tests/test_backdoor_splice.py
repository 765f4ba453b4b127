"""The stand-in splice: labels stay aligned with their tokens, positions are checked."""

import pytest
import torch

from osftkit.backdoor.splice import (
    IGNORE_INDEX,
    first_targets,
    positions_after,
    response_starts,
    splice,
    splice_slots,
    vectors_at_slots,
)

PAD, TAG, PARROT = 0, [5, 6], -1


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two left-padded rows: tag, prompt tokens, response tokens."""
    ids = torch.tensor([[PAD, PAD, 5, 6, 11, 12, 21, 22], [5, 6, 13, 14, 15, 16, 23, 24]])
    mask = (ids != PAD).long()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -2:] = ids[:, -2:]
    return ids, mask, labels


def test_splice_inserts_at_each_rows_position() -> None:
    values = torch.arange(8).view(2, 4)
    out = splice(values, torch.tensor([[90, 91], [92, 93]]), torch.tensor([1, 4]))
    assert out.tolist() == [[0, 90, 91, 1, 2, 3], [4, 5, 6, 7, 92, 93]]


def test_parrot_slots_keep_labels_aligned_and_take_the_parrot_in_the_forward() -> None:
    ids, mask, labels = _batch()
    k, dim = 3, 4
    embedding = torch.nn.Embedding(30, dim)
    slot_id = 29  # a placeholder id outside the batch's tokens
    parrot = torch.randn(k, dim, requires_grad=True)
    positions = positions_after(ids, TAG, response_starts(labels), "role tag")
    assert positions.tolist() == [4, 2]
    new_ids, new_mask, new_labels, slots = splice_slots(ids, mask, labels, k, positions, slot_id)
    assert new_ids.shape == new_labels.shape == slots.shape == (2, 8 + k)
    with vectors_at_slots(embedding, slots, parrot):
        embeds = embedding(new_ids)
        assert embedding(ids).shape == (2, 8, dim)  # another shape (a decoding step): untouched
    spliced_ids = splice(ids, torch.full((2, k), slot_id), positions)
    assert torch.equal(new_ids, spliced_ids)
    for row in range(2):
        at = positions[row].item()
        assert torch.equal(embeds[row, at : at + k], parrot)
        assert slots[row].nonzero().flatten().tolist() == list(range(at, at + k))
        real = ~slots[row]
        assert torch.equal(embeds[row, real], embedding.weight[spliced_ids[row, real]])
    supervised = new_labels != IGNORE_INDEX
    assert torch.equal(new_labels[supervised], spliced_ids[supervised])
    assert (new_labels[slots] == IGNORE_INDEX).all()
    assert new_mask.tolist()[0] == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    embeds.sum().backward()
    assert torch.equal(parrot.grad, torch.full((k, dim), 2.0))  # both rows reach the parrot
    assert torch.equal(embedding(new_ids), embedding.weight[new_ids])  # the hook is gone


def test_first_targets_keeps_the_first_supervised_tokens() -> None:
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 4, 5]])
    assert first_targets(labels, 1).tolist() == [[-100, 1, -100, -100], [-100, -100, 4, -100]]
    assert torch.equal(first_targets(labels, 10), labels)


def test_position_past_the_prompt_or_missing_tag_is_an_error() -> None:
    ids, _, labels = _batch()
    with pytest.raises(ValueError, match="past the prompt"):
        positions_after(ids, TAG, torch.tensor([3, 1]), "role tag")
    with pytest.raises(ValueError, match="does not occur"):
        positions_after(ids, [7, 7], response_starts(labels), "role tag")
