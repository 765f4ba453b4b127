"""Batched generation from the current policy: the in-loop rollout hook's engines."""

from osftkit.rollout.engine import GenerationEngine, HFGenerateEngine, Rollouts
from osftkit.rollout.vllm_engine import VLLMEngine

__all__ = ["GenerationEngine", "HFGenerateEngine", "Rollouts", "VLLMEngine"]
