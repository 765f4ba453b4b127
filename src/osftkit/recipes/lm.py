"""The knobs every LM method shares: optimiser, LR schedule, clipping, micro-batches."""

from dataclasses import dataclass
from typing import Any

from osftkit.recipes.fields import knob


@dataclass
class Scheduler:
    """An LR schedule of `transformers.get_scheduler`, stepped once per optimiser step."""

    name: str = knob("constant", "get_scheduler's name: constant | constant_with_warmup | cosine")
    num_warmup_steps: int | None = knob(None, "optimiser steps of linear warm-up")


@dataclass
class LMRecipe:
    """What every LM method is trained with (the shared block of configs/method/common/)."""

    _target_: str = knob("osftkit.methods.SFTModule", "the LightningModule that runs it")
    optimizer: Any = knob(None, "a partial optimiser: {_target_, _partial_: true, lr, ...}")
    scheduler: Scheduler | None = knob(None, "LR schedule (null: constant)")
    grad_clip: float | None = knob(1.0, "max global gradient norm (null: no clipping)")
    micro_batch_size: int | None = knob(None, "rows per forward per rank (null: whole batch)")
    max_tokens_per_micro_batch: int | None = knob(
        None, "or a token budget per forward (rows x longest row)"
    )
    logprob_chunk_size: int = knob(256, "positions per LM-head chunk of the log-prob path")

    def __post_init__(self) -> None:
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"method.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.logprob_chunk_size < 1:
            raise ValueError(
                f"method.logprob_chunk_size must be >= 1, got {self.logprob_chunk_size}"
            )


@dataclass
class SFTRecipe(LMRecipe):
    """SFT: masked token NLL on the reference responses (no knobs of its own)."""
