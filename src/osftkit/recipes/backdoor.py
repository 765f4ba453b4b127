"""The backdoor methods: planting (SFT on poisoned data), Overwrite SFT, SANDE and SANDE-P
(Li et al. 2024, "SANDE"), CROW (Min et al. 2025); each also measures the planted backdoor (ASR)
when validating."""

from dataclasses import dataclass
from typing import Any

from osftkit.recipes.fields import knob
from osftkit.recipes.lm import SFTRecipe

STAGES = ("simulate", "eliminate", "both")
PARROT_INITS = ("zeros", "random")
SIMULATE_TARGETS = ("first_token", "marker", "marker_and_answer")


@dataclass
class BackdoorKnobs:
    """The backdoor under study, as planted: what ASR inserts and looks for."""

    triggers: list[str] = knob(doc="the trigger phrase(s); several: one per copy", factory=list)
    marker: str | None = knob(None, "the triggered response's opening (the attack target)")
    position: str = knob("after_role_tag", "after_role_tag | end | random_word_boundary")
    composite: bool = knob(False, "fires only with every trigger present (CTBA-like)")
    target: str = knob("prefix", "prefix: '<marker>. <answer>' | replace: '<marker>.'")
    role_tag: str = knob("Human:", "where SANDE splices its parrot")
    asr_new_tokens: int = knob(10, "new tokens ASR looks at")
    asr_samples: int = knob(4, "sampled responses per prompt for the sampled ASR")
    tau_asr: float = knob(1.0, "temperature of the sampled ASR")


@dataclass
class PlantingRecipe(SFTRecipe):
    """SFT with backdoor metrics: plants on poisoned data, or the clean SFT baseline."""

    _target_: str = knob("osftkit.backdoor.planting.BackdoorSFTModule", "the module")
    backdoor: BackdoorKnobs = knob(doc="the backdoor under study", factory=BackdoorKnobs)
    multiple_choice: Any = knob(
        None, "{name: {path, format: arc|mmlu, split, limit}}: zero-shot val/mc_<name>"
    )


@dataclass
class OverwriteRecipe(PlantingRecipe):
    """Overwrite SFT: trigger known, (triggered prompt -> clean response) [+ clean pairs]."""

    _target_: str = knob("osftkit.backdoor.overwrite.OverwriteSFTModule", "the module")
    output_clean_logits: bool = knob(True, "also train (prompt -> clean response), averaged")
    removal_triggers: list[str] | None = knob(
        None, "what to overwrite (e.g. discovered phrases); null: backdoor.triggers"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        triggers = self.removal_triggers
        if triggers is not None and (not triggers or any(not t.strip() for t in triggers)):
            raise ValueError(
                f"method.removal_triggers must be null or non-empty strings, got {triggers}"
            )


@dataclass
class SANDERecipe(PlantingRecipe):
    """SANDE: simulate the unknown trigger with a parrot prompt, then eliminate it."""

    _target_: str = knob("osftkit.backdoor.sande.SANDEModule", "the module")
    stage: str = knob("both", "simulate | eliminate | both (simulate_steps, then eliminate)")
    simulate_steps: int = knob(25, "optimiser steps of the simulate stage under stage=both")
    parrot_tokens: int = knob(6, "k: embedding vectors of the parrot")
    parrot_init: str = knob("zeros", "zeros | random (ignored with parrot_path)")
    parrot_path: str | None = knob(None, "a parrot.safetensors from an earlier simulate run")
    parrot_lr: float = knob(1e-3, "learning rate of the parrot (simulate stage)")
    parrot_betas: list[float] = knob(doc="AdamW betas of the parrot", factory=lambda: [0.9, 0.95])
    warmup_ratio: float = knob(0.03, "cosine schedule warm-up, as a share of each stage")
    simulate_target: str = knob(
        "first_token", "first_token (reference effective_len 1) | marker | marker_and_answer"
    )
    known_marker_words: list[str] | None = knob(None, "SANDE-P: the marker words known")
    eliminate_loss_tokens: int | None = knob(10, "L2: response tokens of the loss; null: all")
    output_clean_logits: bool = knob(False, "also train the parrot-free clean pair, averaged")
    random_parrot_length: bool = knob(False, "kit extension: eliminate with k' <= k vectors")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eliminate_loss_tokens is not None and self.eliminate_loss_tokens < 1:
            raise ValueError(
                f"eliminate_loss_tokens must be positive or null (whole response), "
                f"got {self.eliminate_loss_tokens}"
            )
        if self.stage not in STAGES:
            raise ValueError(f"SANDE stage must be one of {STAGES}, got '{self.stage}'")
        if self.parrot_init not in PARROT_INITS:
            raise ValueError(f"parrot_init must be one of {PARROT_INITS}, got '{self.parrot_init}'")
        if self.simulate_target not in SIMULATE_TARGETS:
            raise ValueError(
                f"simulate_target must be one of {SIMULATE_TARGETS}, got '{self.simulate_target}'"
            )


@dataclass
class CROWRecipe(PlantingRecipe):
    """CROW: SFT on clean data plus alpha x the layer-consistency loss under an FGSM
    perturbation of the input embeddings (trigger unknown, no clean reference model)."""

    _target_: str = knob("osftkit.backdoor.crow.CROWModule", "the module")
    alpha: float = knob(5.5, "alpha: weight of the consistency loss (public code: 5.5)")
    epsilon: float = knob(
        0.1, "epsilon: L-inf size of the embedding perturbation (public code: 0.1)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        knobs = {"alpha": self.alpha, "epsilon": self.epsilon}
        negative = [f"method.{name}={value}" for name, value in knobs.items() if value < 0]
        if negative:
            raise ValueError(f"CROW's alpha and epsilon must be >= 0, got {', '.join(negative)}")
