"""GRPO (Shao et al. 2024) with the knobs of Dr. GRPO (Liu et al. 2025) and DAPO (Yu et al.
2025)."""

from dataclasses import dataclass
from typing import Any

from osftkit.recipes.fields import knob, nested
from osftkit.recipes.rollout import RolloutRecipe


@dataclass
class OverlongBuffer:
    """DAPO's soft length penalty: 0 up to max_new_tokens - length, then linear down to
    -penalty_factor at max_new_tokens (a truncated response gets the full penalty)."""

    length: int = knob(128, "L_cache: tokens before max_new_tokens where the penalty starts")
    penalty_factor: float = knob(1.0, "the penalty at max_new_tokens")

    def __post_init__(self) -> None:
        if self.penalty_factor < 0:
            raise ValueError("method.overlong_buffer.penalty_factor must be >= 0")


@dataclass
class DynamicSampling:
    """DAPO's dynamic sampling: groups whose rewards are all equal are dropped and further
    prompts generated until the batch holds as many informative groups as it had prompts."""

    max_generation_batches: int = knob(10, "generation batches per step before training")

    def __post_init__(self) -> None:
        if self.max_generation_batches < 1:
            raise ValueError("method.dynamic_sampling.max_generation_batches must be >= 1")


@dataclass
class GRPORecipe(RolloutRecipe):
    """G rollouts, verifiable reward, group-normalised advantages, clipped ratio."""

    _target_: str = knob("osftkit.methods.GRPOModule", "the LightningModule that runs it")
    group_size: int = knob(8, "G: responses sampled per prompt")
    normalize_std: bool = knob(True, "divide advantages by the group's std (false: Dr. GRPO)")
    clip_eps: float = knob(0.2, "epsilon: ratio clipped to [1 - clip_eps, 1 + clip_eps_high]")
    clip_eps_high: float | None = knob(None, "epsilon_high (DAPO's clip-higher: 0.28); null: eps")
    dynamic_sampling: Any = knob(None, "DAPO's DynamicSampling {max_generation_batches}")
    overlong_buffer: Any = knob(None, "DAPO's OverlongBuffer {length, penalty_factor}")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dynamic_sampling: DynamicSampling | None = nested(
            DynamicSampling, self.dynamic_sampling, "dynamic_sampling"
        )
        self.overlong_buffer: OverlongBuffer | None = nested(
            OverlongBuffer, self.overlong_buffer, "overlong_buffer"
        )
        if self.clip_eps <= 0 or (self.clip_eps_high is not None and self.clip_eps_high <= 0):
            raise ValueError(
                f"clip_eps and clip_eps_high must be > 0, got {self.clip_eps} and "
                f"{self.clip_eps_high}"
            )
        if self.dynamic_sampling and self.group_size < 2:
            raise ValueError(
                "method.dynamic_sampling needs group_size >= 2 (a group of 1 is equal)"
            )
        buffer = self.overlong_buffer
        if buffer and not 1 <= buffer.length <= self.max_new_tokens:
            raise ValueError(
                f"method.overlong_buffer.length must be in [1, max_new_tokens="
                f"{self.max_new_tokens}], got {buffer.length}"
            )

    @property
    def clip_high(self) -> float:
        """epsilon_high: clip_eps_high, or clip_eps when unset."""
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high
