"""Feature tests with FDR control: the IRT, the One-Shot Feature Test, samplers, the callback."""

from osftkit.interpret.callback import FeatureTestCallback
from osftkit.interpret.fdr import bh_reject, knockoff_reject, knockoff_threshold
from osftkit.interpret.samplers import (
    CategoricalSampler,
    ExactNullSampler,
    GaussianConditionalSampler,
    LMInfillSampler,
    Sampler,
)
from osftkit.interpret.tests import FeatureTestInputs, FeatureTestResult, irt, one_shot_test

__all__ = [
    "CategoricalSampler",
    "ExactNullSampler",
    "FeatureTestCallback",
    "FeatureTestInputs",
    "FeatureTestResult",
    "GaussianConditionalSampler",
    "LMInfillSampler",
    "Sampler",
    "bh_reject",
    "irt",
    "knockoff_reject",
    "knockoff_threshold",
    "one_shot_test",
]
