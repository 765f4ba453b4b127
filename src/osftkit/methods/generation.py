"""Sampling from the policy through the generation engine, decoding, and the answer checker's
verdicts (the rewards)."""

from contextlib import nullcontext

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from osftkit.hardware import gathered_weights
from osftkit.methods.inputs import RunInputs
from osftkit.rollout import GenerationEngine, Rollouts
from osftkit.rollout.engine import end_of_turn_ids


class Generation:
    """CausalLMModule's rollouts: `generate` G responses per prompt, `decode`, `score` them."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    engine: GenerationEngine
    inputs: RunInputs

    def generate(
        self, batch: dict, num_samples: int, temperature: float, top_p: float, max_new_tokens: int
    ) -> Rollouts:
        """Sample from the model as it is now (no grad, eval mode) through the engine; a sharded
        model is gathered once for the whole rollout when the engine decodes with it."""
        gather = self.engine.decodes_with_policy
        with gathered_weights(self.model) if gather else nullcontext():
            return self.engine.generate(
                self.model,
                batch["prompt_ids"],
                batch["prompt_mask"],
                num_samples=num_samples,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                eos_token_id=end_of_turn_ids(self.tokenizer, self.model.generation_config),
                pad_token_id=self.tokenizer.pad_token_id,
            )

    def decode(self, rollouts: Rollouts) -> list[str]:
        ids = (rollouts.response_ids * rollouts.response_mask).tolist()
        lengths = rollouts.lengths.tolist()
        return self.tokenizer.batch_decode(
            [row[:n] for row, n in zip(ids, lengths, strict=True)], skip_special_tokens=True
        )

    def score(self, rollouts: Rollouts, answers: list[str]) -> Tensor:
        """(prompts, G) booleans from the data module's answer checker."""
        golds = [a for a in answers for _ in range(rollouts.group_size)]
        correct = self.inputs.checker.score(self.decode(rollouts), golds)
        return torch.tensor(correct, device=self.device).view(-1, rollouts.group_size)
