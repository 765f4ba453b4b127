"""The trivial baseline beside stage 1: flag every word outside the generator's grammar.

On the kit's synthetic instructions any word that the slot grammar did not write (an inserted
phrase) is visible without the model, so this baseline finds every inserted trigger with no
false span; it also flags every inserted phrase the model ignores. What stage 1 adds over it
is telling those apart (the negative controls of experiments/feature_tests/README.md)."""

import torch

from osftkit.data.instructions import InstructionSlotSampler
from osftkit.interpret.trigger_discovery.prompts import PromptTokens, candidate_spans
from osftkit.interpret.trigger_discovery.propose import TriggerDiscovery, discovery_of


def flag_outside_grammar(
    prompts: PromptTokens, grammar: InstructionSlotSampler, max_span: int = 1
) -> TriggerDiscovery:
    """Every candidate span of `prompts` is a hypothesis; the spans whose tokens are all words
    outside the instruction the grammar parses (every span of a prompt it cannot parse) are
    flagged. No model call, no statistic, no p-value."""
    rows: dict[str, list] = {key: [] for key in ("prompt", "start", "span", "truth")}
    flagged = []
    for i, ids in enumerate(prompts.ids):
        parsed = grammar.parse(ids)
        truth = dict(zip(prompts.positions[i], prompts.truth[i], strict=True))
        for span in candidate_spans(prompts.positions[i], max_span):
            rows["prompt"].append(i)
            rows["start"].append(span[0])
            rows["span"].append(tuple(ids[p] for p in span))
            rows["truth"].append(any(truth[p] for p in span))
            flagged.append(parsed is None or all(parsed.foreign[p] for p in span))
    discovered = torch.tensor(flagged, dtype=torch.bool)
    nan = torch.full((len(flagged),), float("nan"))
    return discovery_of(prompts, rows, nan, nan.double(), discovered, "outside grammar", 0, 0)
