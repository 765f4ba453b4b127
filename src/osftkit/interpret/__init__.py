"""Feature tests with FDR control: the IRT, the One-Shot Feature Test, samplers, calibration,
trigger discovery and the callback."""

from osftkit.data.null_samplers import (
    CategoricalSampler,
    ExactNullSampler,
    GaussianConditionalSampler,
    Sampler,
)
from osftkit.interpret.callback import FeatureTestCallback
from osftkit.interpret.fdr_control import knockoff_reject, knockoff_threshold, step_up_reject
from osftkit.interpret.feature_test import FeatureTestInputs, FeatureTestResult, irt, one_shot_test
from osftkit.interpret.samplers import LMInfillSampler, train_masked_lm

__all__ = [
    "CategoricalSampler",
    "ExactNullSampler",
    "FeatureTestCallback",
    "FeatureTestInputs",
    "FeatureTestResult",
    "GaussianConditionalSampler",
    "LMInfillSampler",
    "Sampler",
    "irt",
    "knockoff_reject",
    "knockoff_threshold",
    "one_shot_test",
    "step_up_reject",
    "train_masked_lm",
]
