"""Trigger discovery: which prompt spans make a backdoored causal LM emit its marker?

One concept per file: ``prompts`` (tokenised prompts, tested positions, candidate spans),
``propose`` (stage 1: the feature test over spans, and its calibration on clean prompts),
``baseline`` (flag every word outside the grammar, no model), ``confirm`` (stage 2: paired
sign-flip tests of each candidate on fresh prompts), ``pipeline`` (calibrate -> propose ->
confirm -> report, and the run's hook for Overwrite SFT).
"""

from osftkit.interpret.trigger_discovery.baseline import flag_outside_grammar
from osftkit.interpret.trigger_discovery.confirm import (
    Confirmation,
    confirm_candidates,
    score_texts,
    sign_flip_pvalue,
)
from osftkit.interpret.trigger_discovery.pipeline import (
    DISCOVERY_FILE,
    MiscalibratedSamplerError,
    TriggerDiscoveryPipeline,
    discover_removal_triggers,
    report_discovery,
)
from osftkit.interpret.trigger_discovery.prompts import (
    PromptTokens,
    candidate_spans,
    encode_prompts,
    insertion_plan,
    is_word,
    marker_token_ids,
    random_phrases,
    trigger_span,
    vocabulary_sampler,
    word_probs,
)
from osftkit.interpret.trigger_discovery.propose import (
    TriggerDiscovery,
    calibrate_prompts,
    discover_triggers,
)

__all__ = [
    "DISCOVERY_FILE",
    "Confirmation",
    "MiscalibratedSamplerError",
    "PromptTokens",
    "TriggerDiscovery",
    "TriggerDiscoveryPipeline",
    "calibrate_prompts",
    "candidate_spans",
    "confirm_candidates",
    "discover_removal_triggers",
    "discover_triggers",
    "encode_prompts",
    "flag_outside_grammar",
    "insertion_plan",
    "is_word",
    "marker_token_ids",
    "random_phrases",
    "report_discovery",
    "score_texts",
    "sign_flip_pvalue",
    "trigger_span",
    "vocabulary_sampler",
    "word_probs",
]
