"""Captum attributions on the same inputs as a feature test, pooled to one score per feature.

Attributions are scores, not p-values: to compare them with the tests, rank the pooled scores
and read the best TPR at a given realised FDR (``osftkit.metrics.discovery_rates.best_tpr_at_fdr``).
"""

import torch
from captum.attr import (
    FeatureAblation,
    InputXGradient,
    IntegratedGradients,
    KernelShap,
    Lime,
    Saliency,
    ShapleyValueSampling,
)
from torch import Tensor

from osftkit.interpret.feature_test import FeatureTestInputs

GRADIENT_METHODS = {
    "integrated_gradients": IntegratedGradients,
    "saliency": Saliency,
    "input_x_gradient": InputXGradient,
}
PERTURBATION_METHODS = {
    "feature_ablation": FeatureAblation,
    "shapley_value_sampling": ShapleyValueSampling,
}
# Captum fits one surrogate per call for these, so they take one instance at a time.
SURROGATE_METHODS = {"kernel_shap": KernelShap, "lime": Lime}
METHODS = GRADIENT_METHODS | PERTURBATION_METHODS | SURROGATE_METHODS


def per_feature(attributions: Tensor, feature_mask: Tensor, num_features: int) -> Tensor:
    """(n, *shape) element attributions -> (n, d) sums over each feature's elements."""
    flat = attributions.flatten(1).float()
    out = torch.zeros(flat.shape[0], num_features, device=flat.device)
    return out.index_add_(1, feature_mask.flatten().to(flat.device), flat)


def gradient_attributions(method: str, test: FeatureTestInputs, instance: Tensor) -> Tensor:
    if not test.inputs.is_floating_point():
        raise ValueError(f"{method} needs float inputs; token inputs take perturbation methods")
    inputs = test.inputs.clone().requires_grad_()
    explainer = GRADIENT_METHODS[method](test.score_fn)
    return explainer.attribute(inputs, additional_forward_args=(instance,))


def perturbation_attributions(
    method: str, test: FeatureTestInputs, instance: Tensor, baseline: float
) -> Tensor:
    explainer = PERTURBATION_METHODS[method](test.score_fn)
    return explainer.attribute(
        test.inputs.clone(),
        baselines=baseline,
        feature_mask=test.feature_mask.unsqueeze(0),
        additional_forward_args=(instance,),
        perturbations_per_eval=test.num_features,
    )


def surrogate_attributions(
    method: str, test: FeatureTestInputs, instance: Tensor, baseline: float, num_samples: int
) -> Tensor:
    explainer = SURROGATE_METHODS[method](test.score_fn)
    rows = [
        explainer.attribute(
            test.inputs[i : i + 1].clone(),
            baselines=baseline,
            feature_mask=test.feature_mask.unsqueeze(0),
            additional_forward_args=(instance[i : i + 1],),
            n_samples=num_samples,
            perturbations_per_eval=num_samples,
        )
        for i in range(test.inputs.shape[0])
    ]
    return torch.cat(rows)


def attribute(
    method: str, test: FeatureTestInputs, baseline: float = 0.0, num_samples: int = 200
) -> Tensor:
    """(n, d) attribution scores of a captum method (a key of METHODS) for test.score_fn.

    baseline is the value that perturbation and surrogate methods put in a removed feature;
    num_samples the perturbations per instance of kernel_shap and lime.
    """
    if method not in METHODS:
        raise ValueError(f"unknown captum method {method!r}; choose from {sorted(METHODS)}")
    if test.overlapping:
        raise ValueError("captum attributions need a feature id map, not overlapping masks")
    instance = torch.arange(test.inputs.shape[0], device=test.inputs.device)
    with torch.inference_mode(False), torch.enable_grad():  # callbacks may run under no_grad
        if method in GRADIENT_METHODS:
            attr = gradient_attributions(method, test, instance)
        elif method in PERTURBATION_METHODS:
            attr = perturbation_attributions(method, test, instance, baseline)
        else:
            attr = surrogate_attributions(method, test, instance, baseline, num_samples)
    return per_feature(attr.detach(), test.feature_mask, test.num_features)
