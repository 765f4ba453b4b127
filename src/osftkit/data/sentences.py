"""Synthetic sentiment sentences with token-level ground truth.

Each of `length` positions holds, independently, a sentiment word with probability
`sentiment_prob` (positive or negative, equally likely) or else a neutral word. The label is the
majority polarity (sentences with a tie are redrawn); the sentiment positions are the truth.
"""

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from osftkit.data.null_samplers import CategoricalSampler, Sampler
from osftkit.data.tensor_datamodule import TensorDataModule

NEUTRAL = (  # noqa: SIM905
    "the a this it and with of was is very really quite movie film plot actor story scene music "
    "ending"
).split()
POSITIVE = ["good", "great", "excellent", "wonderful", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dull", "poor"]
MASK = "[MASK]"  # never in the data: the mask token of an infill language model
VOCAB = [*NEUTRAL, *POSITIVE, *NEGATIVE, MASK]


def token_probs(sentiment_prob: float) -> Tensor:
    """Per-position distribution over VOCAB before the tie rejection (the mask gets none)."""
    neutral = torch.full((len(NEUTRAL),), (1 - sentiment_prob) / len(NEUTRAL))
    polar = torch.full((len(POSITIVE) + len(NEGATIVE),), sentiment_prob / (2 * len(POSITIVE)))
    return torch.cat([neutral, polar, torch.zeros(1)])


def neutral_probs() -> Tensor:
    """Uniform over the neutral words: the null distribution of a position."""
    return torch.cat([torch.ones(len(NEUTRAL)), torch.zeros(len(VOCAB) - len(NEUTRAL))])


POLARITY = torch.tensor([0] * len(NEUTRAL) + [1] * len(POSITIVE) + [-1] * len(NEGATIVE) + [0])


def polarity(ids: Tensor) -> Tensor:
    """+1 for positive words, -1 for negative ones, 0 otherwise."""
    return POLARITY[ids]


def make_sentences(
    num: int, length: int, sentiment_prob: float, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """(token ids (num, length), labels (num,), truth (num, length))."""
    probs = token_probs(sentiment_prob)
    kept: list[Tensor] = []
    while sum(len(k) for k in kept) < num:
        ids = torch.multinomial(probs, num * length, replacement=True, generator=generator)
        ids = ids.view(num, length)
        kept.append(ids[polarity(ids).sum(1) != 0])
    ids = torch.cat(kept)[:num]
    return ids, (polarity(ids).sum(1) > 0).long(), polarity(ids) != 0


class SentencesDataModule(TensorDataModule):
    """Batches (token ids, label, truth); tokens are features, one per position."""

    def __init__(
        self,
        length: int = 10,
        sentiment_prob: float = 0.2,
        num_train: int = 5_000,
        num_val: int = 500,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vocab = VOCAB
        self.feature_mask = torch.arange(length)

    def make_split(self, num: int, seed: int) -> TensorDataset:
        hp = self.hparams
        gen = torch.Generator().manual_seed(seed)
        return TensorDataset(*make_sentences(num, hp.length, hp.sentiment_prob, gen))

    def feature_sampler(self) -> Sampler:
        """The null by construction, as in the simulation: a position that carries no sentiment
        holds a uniformly drawn neutral word."""
        return CategoricalSampler(neutral_probs())
