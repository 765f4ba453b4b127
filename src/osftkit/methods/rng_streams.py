"""A run's RNG streams: kept in checkpoints, and a validation's own beside training's."""

from typing import Any

import torch

from osftkit.checkpointing import (
    local_rng_states,
    restore_rng_states,
    rng_states,
    run_seed,
    set_local_rng_states,
)


class RNGStreams:
    """CausalLMModule's RNG hooks: a resumed run continues the rollouts' random streams, and a
    validation samples from a stream of its own."""

    training_rng: dict[str, Any] | None = None  # set while a validation samples

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Rollouts draw from the global RNGs: a run resumed from this checkpoint must continue
        # their streams to match an uninterrupted run; each rank its own. A checkpoint taken
        # inside a validation (a callback's on_validation_end) keeps the training stream too.
        validation = local_rng_states()
        if self.training_rng is not None:
            set_local_rng_states(self.training_rng)
        checkpoint["rng_states"] = rng_states()
        if self.training_rng is not None:
            set_local_rng_states(validation)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])

    def on_validation_start(self) -> None:
        """Validation samples from a stream of its own, seeded by (seed, step, rank), and hands
        the training stream back untouched: how often a run validates, or whether it validated
        before the fit, does not change what it trains on."""
        self.training_rng = local_rng_states()
        torch.manual_seed((run_seed() * 1_000_003 + self.global_step) * 1_009 + self.global_rank)

    def on_validation_end(self) -> None:
        set_local_rng_states(self.training_rng)
        self.training_rng = None
