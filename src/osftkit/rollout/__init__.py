"""Batched generation from the current policy: the in-loop rollout hook's engines."""

from osftkit.rollout.engine import GenerationEngine, HFGenerateEngine, Rollouts

__all__ = ["GenerationEngine", "HFGenerateEngine", "Rollouts"]
