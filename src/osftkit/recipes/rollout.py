"""The knobs of the methods that train on their own rollouts (Online SFT, EM-FT, GRPO & co.)."""

from dataclasses import dataclass

from osftkit.recipes.fields import knob
from osftkit.recipes.lm import LMRecipe

AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


@dataclass
class RolloutRecipe(LMRecipe):
    """G responses per prompt from the current policy, then optimiser steps on them."""

    group_size: int = knob(1, "G: responses sampled per prompt")
    tau_sample: float = knob(1.0, "tau_s: sampling temperature of the rollouts")
    top_p: float = knob(1.0, "nucleus sampling of the rollouts")
    max_new_tokens: int = knob(64, "response length limit of the rollouts")
    loss_aggregation: str = knob("token-mean", "token-mean | seq-mean-token-sum | ... (Dr. GRPO)")
    num_minibatches: int = knob(1, "optimiser steps per generated batch (reference: 2)")
    kl_coef: float = knob(0.0, "beta: weight of the k3 KL to a frozen copy of the start")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 1:
            raise ValueError(f"group_size (G) must be >= 1, got {self.group_size}")
        if self.tau_sample <= 0:
            raise ValueError(f"tau_sample must be > 0, got {self.tau_sample}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.loss_aggregation not in AGGREGATIONS:
            raise ValueError(
                f"loss_aggregation must be one of {AGGREGATIONS}, got '{self.loss_aggregation}'"
            )
        if self.num_minibatches < 1:
            raise ValueError(f"num_minibatches must be >= 1, got {self.num_minibatches}")
