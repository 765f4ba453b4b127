"""Online SFT (Li et al. 2025) and its offline variant; EM-FT shares the knobs."""

from dataclasses import dataclass
from typing import Any

from osftkit.recipes.fields import knob, nested
from osftkit.recipes.rollout import RolloutRecipe

SCHEDULES = ("linear", "cosine")


@dataclass
class Anneal:
    """tau_sample moved to 1 over `epochs` epochs."""

    epochs: float = knob(1.0, "epochs over which tau_sample reaches 1")
    schedule: str = knob("linear", "linear | cosine")

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"method.anneal.epochs must be > 0, got {self.epochs}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"anneal schedule must be 'linear' or 'cosine', got '{self.schedule}'")


@dataclass
class OSFTRecipe(RolloutRecipe):
    """Online SFT: sample at tau_s, train the NLL of the samples at tau_t; no reward.
    EM-FT (`method=em_ft`) has the same knobs and trains the token entropy instead."""

    _target_: str = knob("osftkit.methods.OSFTModule", "the LightningModule that runs it")
    tau_sample: float = knob(0.6, "tau_s: sampling temperature (below tau_t)")
    tau_train: float = knob(1.0, "tau_t: the loss's logits are divided by it")
    anneal: Any = knob(None, "Anneal {epochs, schedule}: tau_s -> 1 (null: fixed tau_s)")
    log_reward: bool = knob(False, "score the samples for logging only (never in the loss)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.anneal: Anneal | None = nested(Anneal, self.anneal, "anneal")
        if self.tau_train <= 0:
            raise ValueError(f"tau_train must be > 0, got {self.tau_train}")


@dataclass
class OfflineOSFTRecipe(OSFTRecipe):
    """Offline variant: one frozen set sampled once from the start at tau_s, then SFT on it."""

    _target_: str = knob("osftkit.methods.OfflineOSFTModule", "the LightningModule that runs it")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.anneal is not None:
            raise ValueError("method.anneal: the offline set is sampled once, at tau_sample")
