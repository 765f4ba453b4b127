"""Batched generation from the current policy: the in-loop rollout hook's engines."""

from osftkit.rollout.engine import GenerationEngine, HFGenerateEngine, Rollouts
from osftkit.rollout.paged import PagedEngine
from osftkit.rollout.vllm_engine import VLLMEngine

__all__ = ["GenerationEngine", "HFGenerateEngine", "PagedEngine", "Rollouts", "VLLMEngine"]
