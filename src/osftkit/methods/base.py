"""CausalLMModule: what every LM method shares, composed of one concept per file: the optimiser
step (optimisation.py), log-probs (scoring.py), generation and rewards (generation.py),
validation (validation.py) and the RNG streams (rng_streams.py)."""

from dataclasses import asdict
from typing import Any

from hydra.utils import instantiate
from lightning import LightningModule
from torch import nn
from transformers import PreTrainedTokenizerBase

from osftkit.hardware import FSDP2Strategy
from osftkit.methods.generation import Generation
from osftkit.methods.inputs import RunInputs
from osftkit.methods.micro_batches import MicroBatching
from osftkit.methods.optimisation import Optimisation
from osftkit.methods.rng_streams import RNGStreams
from osftkit.methods.scoring import TokenScoring
from osftkit.methods.validation import Validation, ValidationSettings
from osftkit.models.logprobs import check_logprob_args
from osftkit.recipes import LMRecipe
from osftkit.rollout import GenerationEngine, HFGenerateEngine

__all__ = ["CausalLMModule", "ValidationSettings"]


class CausalLMModule(
    Optimisation, TokenScoring, Generation, Validation, RNGStreams, LightningModule
):
    """Base for SFT, OSFT, GRPO and the backdoor methods. Uses manual optimisation so that one
    generated batch can feed several optimiser steps (`self.gradient_step(...)` is one step).

    Each step's mini-batch runs as micro-batches (`micro_batch_size` rows, or a token budget
    `max_tokens_per_micro_batch`), each trimmed to its own longest row, with the gradients
    accumulated and normalised over the whole mini-batch; validation scoring is cut the same way.
    Log-probs go through `token_logprobs` with the LM head in `logprob_chunk_size` positions.
    """

    recipe_type: type[LMRecipe] = LMRecipe

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        recipe: LMRecipe,
        validation: dict[str, Any] | ValidationSettings | None = None,
        engine: GenerationEngine | None = None,
        inputs: RunInputs | None = None,
    ) -> None:
        if not isinstance(recipe, self.recipe_type):
            raise TypeError(f"{type(self).__name__} takes a {self.recipe_type.__name__}")
        check_logprob_args(1.0, recipe.logprob_chunk_size)
        micro_batching = MicroBatching(recipe.micro_batch_size, recipe.max_tokens_per_micro_batch)
        super().__init__()
        self.recipe = recipe
        self.inputs = inputs or RunInputs()
        self.micro_batching = micro_batching
        self.automatic_optimization = False
        # For the loggers only (plain values, so checkpoints load with weights_only=True); the
        # module reads its knobs from `self.recipe`.
        self.save_hyperparameters({"method": asdict(recipe)})
        self.optimizer_factory = (
            instantiate(recipe.optimizer, _convert_="all")
            if isinstance(recipe.optimizer, dict)
            else recipe.optimizer
        )
        self.model = (
            model.train()
        )  # from_pretrained returns eval mode; Lightning toggles it for validation
        self.tokenizer = tokenizer
        self.engine = engine or HFGenerateEngine()
        self.validation_settings = (
            validation
            if isinstance(validation, ValidationSettings)
            else ValidationSettings(**(validation or {}))
        )
        self.val_metrics = nn.ModuleDict()

    # ---- hardware -------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under `hardware=fsdp*`: shard the policy (and the frozen KL reference) with FSDP2."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, FSDP2Strategy):
            return
        for module in (self.model, getattr(self, "reference", None)):
            if module is not None:
                strategy.shard(module)

    def minibatch_rows(self) -> int | None:
        """Rows of one training mini-batch on this rank (None when the data does not say)."""
        if self.inputs.batch_size is None:
            return None
        return self.inputs.batch_size // self.trainer.world_size

    def longest_row(self) -> int | None:
        """Tokens of the longest training or validation row (prompt + response)."""
        inputs = self.inputs
        if inputs.max_prompt_length is None or inputs.max_response_length is None:
            return None
        longest_response = max(inputs.max_response_length, self.validation_settings.max_new_tokens)
        return inputs.max_prompt_length + longest_response

    def setup(self, stage: str) -> None:
        self.micro_batching.check_fits(
            self.minibatch_rows() if stage == "fit" else None, self.longest_row()
        )
        self.add_val_metrics()
