"""Infill samplers for real text: a masked language model, trained on CLEAN data, proposes the
token(s) of a feature from both sides of it.

Never use the model under test as its own sampler: its proposals follow its own preferences
(a backdoored LM's included) and, from the left context only, are not P(x_j | x_-j); on clean
prompts such a sampler put 10-23% of the tokens at p <= 2/101 (a valid one puts about 2%).
Check any sampler with :func:`osftkit.interpret.calibration.calibrate` before reporting its FDR.
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from osftkit.data.null_samplers import draw_tokens, fill, token_positions

MLM_MASK_RATE = 0.15  # BERT's masking rate


class LMInfillSampler:
    """Proposes replacement tokens from a masked LM that sees both sides of the feature.

    The feature's positions (one token or a span) are masked together and each is drawn from
    the model's distribution at its position (for a span: independent draws from the joint
    masking, an approximation of the joint conditional). ``exclude_token_ids`` are never drawn.
    The original token stays drawable unless ``exclude_original``: always changing the word (as
    the paper's text experiment does) breaks the exchangeability behind the IRT's p-values.
    One batched LM call over all instances per feature.
    """

    def __init__(
        self,
        model: nn.Module,
        mask_token_id: int,
        exclude_token_ids: Sequence[int] = (),
        temperature: float = 1.0,
        exclude_original: bool = False,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.model, self.mask_token_id = model.eval(), mask_token_id
        self.exclude_original = exclude_original
        self.exclude_token_ids, self.temperature = list(exclude_token_ids), temperature

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "LMInfillSampler":
        """A local Hugging Face masked-LM directory (e.g. a BERT fine-tuned on the clean corpus)."""
        model = AutoModelForMaskedLM.from_pretrained(path)
        mask_id = kwargs.pop("mask_token_id", None) or model.config.to_dict().get("mask_token_id")
        if mask_id is None:
            raise ValueError(f"{path} names no mask token: pass mask_token_id=")
        return cls(model, mask_id, **kwargs)

    @torch.no_grad()
    def sample(
        self, inputs: Tensor, mask: Tensor, num_draws: int, generator: torch.Generator
    ) -> Tensor:
        positions = token_positions(mask)
        masked = inputs.clone()
        masked[:, positions] = self.mask_token_id
        logits = self.model(input_ids=masked).logits[:, positions].float() / self.temperature
        logits[..., self.exclude_token_ids] = -torch.inf
        probs = logits.softmax(-1)
        tokens = [
            draw_tokens(probs[:, k], inputs[:, pos], num_draws, generator, self.exclude_original)
            for k, pos in enumerate(positions)
        ]
        return fill(inputs, mask, torch.stack(tokens, -1))


def train_masked_lm(
    sequences: Sequence[Sequence[int]],
    vocab_size: int,
    mask_token_id: int,
    pad_token_id: int | None = None,
    steps: int = 600,
    hidden_size: int = 32,
    batch_size: int = 128,
    lr: float = 3e-3,
    max_length: int | None = None,
    seed: int = 0,
) -> BertForMaskedLM:
    """A small BERT masked LM fitted on clean token sequences: the kit's own infill sampler.

    Sequences of different lengths are right-padded with ``pad_token_id`` (masked out of
    attention and loss); ``vocab_size`` must cover ``mask_token_id`` (e.g. one id past the
    tokenizer's vocabulary). ``max_length``: the longest input it will infill (default twice
    the longest training sequence: prompts under test may carry inserted words).
    """
    if not sequences:
        raise ValueError("train_masked_lm needs at least one clean sequence")
    if mask_token_id >= vocab_size:
        raise ValueError(f"mask_token_id {mask_token_id} must be below vocab_size {vocab_size}")
    length = max(len(s) for s in sequences)
    if pad_token_id is None and any(len(s) != length for s in sequences):
        raise ValueError("sequences of different lengths need a pad_token_id")
    ids = torch.full((len(sequences), length), -1 if pad_token_id is None else pad_token_id)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(list(seq))
    real = ids != (-1 if pad_token_id is None else pad_token_id)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_length or 2 * length,
        pad_token_id=pad_token_id,
        mask_token_id=mask_token_id,
    )
    lm = BertForMaskedLM(config)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr)
    for _ in range(steps):
        rows = torch.randint(0, len(ids), (batch_size,), generator=gen)
        batch, attention = ids[rows], real[rows]
        masked = (torch.rand(batch.shape, generator=gen) < MLM_MASK_RATE) & attention
        loss = lm(
            input_ids=batch.masked_fill(masked, mask_token_id),
            attention_mask=attention.long(),
            labels=batch.masked_fill(~masked, -100),
        ).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm.eval()
