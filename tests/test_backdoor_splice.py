"""The stand-in splice: labels stay aligned with their tokens, positions are checked."""

import pytest
import torch

from osftkit.backdoor.splice import (
    IGNORE_INDEX,
    first_targets,
    positions_after,
    response_starts,
    splice,
    splice_inputs,
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


def test_parrot_splice_keeps_labels_aligned() -> None:
    ids, mask, labels = _batch()
    k, dim = 3, 4
    table = torch.randn(30, dim)
    parrot = torch.randn(k, dim)
    positions = positions_after(ids, TAG, response_starts(labels), "role tag")
    assert positions.tolist() == [4, 2]
    embeds, new_mask, new_labels, position_ids = splice_inputs(
        table[ids], mask, labels, parrot, positions
    )
    assert embeds.shape == (2, 8 + k, dim) and new_labels.shape == (2, 8 + k)
    spliced_ids = splice(ids, torch.full((2, k), PARROT), positions)
    for row in range(2):
        at = positions[row].item()
        assert torch.equal(embeds[row, at : at + k], parrot)
        real = spliced_ids[row] != PARROT
        assert torch.equal(embeds[row, real], table[spliced_ids[row, real]])
    supervised = new_labels != IGNORE_INDEX
    assert torch.equal(new_labels[supervised], spliced_ids[supervised])
    assert (new_labels[spliced_ids == PARROT] == IGNORE_INDEX).all()
    assert new_mask.tolist()[0] == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert position_ids.tolist()[1] == list(range(11))
    assert position_ids[0, 2:].tolist() == list(range(9))


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
