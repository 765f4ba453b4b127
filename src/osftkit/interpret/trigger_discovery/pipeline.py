"""The trigger-discovery pipeline: calibrate the sampler on clean prompts, propose (stage 1),
confirm (stage 2), report; and the run's hook that hands the confirmed phrases to Overwrite SFT."""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from transformers import PreTrainedTokenizerBase

from osftkit.backdoor.poison import Position
from osftkit.data.instructions import PLAIN_TEMPLATE, InstructionSlotSampler, build_instructions
from osftkit.interpret.calibration import Calibration
from osftkit.interpret.fdr_control import FdrMethod, check_alpha
from osftkit.interpret.trigger_discovery.confirm import Confirmation, confirm_candidates
from osftkit.interpret.trigger_discovery.prompts import encode_prompts, marker_token_ids, word_probs
from osftkit.interpret.trigger_discovery.propose import (
    Test,
    TriggerDiscovery,
    calibrate_prompts,
    discover_triggers,
)
from osftkit.models import LoadedModel

log = logging.getLogger(__name__)
DISCOVERY_FILE = "discovery.json"
SEED_STRIDE = 1000  # prompt sets of one pipeline seed never share a generator seed


class MiscalibratedSamplerError(ValueError):
    """The sampler failed the calibration check on clean prompts."""


@dataclass
class TriggerDiscoveryPipeline:
    """Calibrate -> propose -> confirm on the kit's synthetic instructions, for a model with a
    known marker: returns the confirmed phrases (Overwrite SFT's ``removal_triggers``).

    The defender is assumed to hold prompts that carry the trigger (simulated here by inserting
    ``attack_triggers``, the planted ones, into held-out instructions as planting did): this is
    not SANDE's setting, where only clean data are available. Stage 1 uses the exact slot
    sampler of ``osftkit.data.instructions`` (inserted words drawn from the clean word
    marginal); calibration runs it on clean prompts and raises unless it passes (override:
    ``allow_miscalibrated``, which only warns).
    """

    num_prompts: int = 50
    confirm_prompts: int = 50
    calibration_prompts: int = 50
    test: Test = "irt"
    alpha: float = 0.1
    num_draws: int = 100
    max_span: int = 3
    method: FdrMethod = "bh"
    confirm_method: FdrMethod = "by"
    num_flips: int = 999
    min_effect: float = 1.0
    max_candidates: int = 5
    significance: float = 0.01
    allow_miscalibrated: bool = False
    split: str = "test"
    seed: int = 0

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if min(self.num_prompts, self.confirm_prompts, self.calibration_prompts) < 1:
            raise ValueError("discovery.num_prompts, confirm_prompts and calibration_prompts >= 1")

    def sampler(self, tokenizer: PreTrainedTokenizerBase, template: str) -> InstructionSlotSampler:
        clean = build_instructions(1000, self.seed, "train")["problem"]
        vocab = word_probs(encode_prompts(tokenizer, clean, template=template), len(tokenizer))
        return InstructionSlotSampler(tokenizer, self.split, template, foreign=vocab)

    def __call__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        marker: str,
        attack_triggers: Sequence[str],
        position: Position = "after_role_tag",
        template: str = PLAIN_TEMPLATE,
    ) -> tuple[Calibration, TriggerDiscovery, Confirmation]:
        marker_ids = marker_token_ids(tokenizer, marker)
        sampler = self.sampler(tokenizer, template)
        # Three independent prompt sets: calibration, proposal (stage 1), confirmation (stage 2).
        sizes = (self.calibration_prompts, self.num_prompts, self.confirm_prompts)
        clean, proposal, fresh = (
            list(build_instructions(size, SEED_STRIDE * self.seed + k, self.split)["problem"])
            for k, size in enumerate(sizes)
        )
        calibration = calibrate_prompts(
            model,
            encode_prompts(tokenizer, clean, template=template),
            marker_ids,
            sampler,
            self.num_draws,
            self.max_span,
            self.significance,
            self.seed,
        )
        if not calibration.passed:
            message = (
                f"the counterfactual sampler fails calibration on clean prompts ({calibration}); "
                "its FDR would not hold. Set discovery.allow_miscalibrated=true to go on anyway"
            )
            if not self.allow_miscalibrated:
                raise MiscalibratedSamplerError(message)
            log.warning("UNCALIBRATED SAMPLER: %s", message)
        triggered = encode_prompts(
            tokenizer, proposal, attack_triggers, position, template, seed=self.seed
        )
        discovery = discover_triggers(
            model,
            triggered,
            marker_ids,
            sampler,
            self.alpha,
            self.test,
            self.num_draws,
            method=self.method,
            max_span=self.max_span,
            seed=self.seed,
        )
        words = sorted({w for p in clean for w in p.split()})
        confirmation = confirm_candidates(
            model,
            tokenizer,
            discovery.candidates(tokenizer, self.max_candidates),
            fresh,
            marker_ids,
            words,
            position,
            template,
            self.alpha,
            self.confirm_method,
            self.num_flips,
            self.min_effect,
            self.seed,
        )
        return calibration, discovery, confirmation


def report_discovery(
    calibration: Calibration,
    discovery: TriggerDiscovery,
    confirmation: Confirmation,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
) -> list[str]:
    """Log the three stages, write them to `directory`/discovery.json; the confirmed phrases."""
    record = {
        "calibration": str(calibration),
        "floor_fraction": calibration.floor_fraction,
        "stage1": discovery.summary(),
        "stage1_phrases": discovery.top_phrases(tokenizer, 10),
        "candidates": confirmation.candidates,
        "effects": confirmation.effects,
        "pvalues": confirmation.pvalues,
        "confirmed": confirmation.triggers,
    }
    log.info("trigger discovery: %s", json.dumps(record))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / DISCOVERY_FILE).write_text(json.dumps(record, indent=1))
    return confirmation.triggers


def discover_removal_triggers(cfg: DictConfig, loaded: LoadedModel) -> None:
    """With a `discovery` block (experiment=discover_overwrite_tiny): calibrate, propose and
    confirm trigger phrases on the loaded model, and hand the confirmed ones to Overwrite SFT
    as `method.removal_triggers` (ASR keeps measuring the planted `method.backdoor`)."""
    if not cfg.get("discovery"):
        return
    attack = cfg.method.backdoor
    pipeline: TriggerDiscoveryPipeline = instantiate(cfg.discovery)
    results = pipeline(
        loaded.model,
        loaded.tokenizer,
        attack.marker,
        attack.triggers,
        attack.position,
        cfg.data.plain_template,
    )
    triggers = report_discovery(*results, loaded.tokenizer, Path(cfg.paths.output_dir))
    if not triggers:
        raise ValueError("trigger discovery confirmed no phrase: nothing to overwrite (see log)")
    cfg.method.removal_triggers = triggers
