"""Cost of the feature tests on the same inputs: one-shot vs IRT (K=100), batched vs looped scoring.

    .venv/bin/python benchmarks/feature_tests_bench.py

Uses the reference MLP (25 -> 100 -> 100 -> 1, untrained: cost does not depend on the weights)
on 100 simulated instances, one CPU thread.
"""

import time
from collections.abc import Callable

import torch

from osftkit.data.features import simulate
from osftkit.data.null_samplers import ExactNullSampler
from osftkit.interpret.feature_test import (
    FeatureTestInputs,
    draw_feature,
    irt,
    one_shot_test,
    score_batched,
)
from osftkit.interpret.statistics import seeded_generator
from osftkit.models.small_nets import MLP

NUM_INSTANCES, NUM_FEATURES, NUM_DRAWS = 100, 25, 100


def timed(fn: Callable[[], object], repeats: int = 3) -> tuple[object, float]:
    """Result and best wall time of `repeats` runs (the first run also pays warm-up costs)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - start)
    return out, min(seconds)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MLP(NUM_FEATURES).eval()
    x, truth = simulate(NUM_INSTANCES, NUM_FEATURES, 0.3, 4.0, 0.0, seeded_generator(0))
    test = FeatureTestInputs(
        x, lambda inputs, _: model(inputs).squeeze(-1), torch.arange(NUM_FEATURES), truth
    )
    sampler = ExactNullSampler()

    print(f"{NUM_INSTANCES} instances x {NUM_FEATURES} features, MLP 25-100-100-1, 1 thread")
    print(f"{'test':<24}{'inputs scored':>14}{'seconds':>10}")
    for name, run in {
        "one-shot one-sided": lambda: one_shot_test(test, sampler, 0.1),
        "one-shot two-sided": lambda: one_shot_test(test, sampler, 0.1, two_sided=True),
        f"IRT K={NUM_DRAWS} one-sided": lambda: irt(test, sampler, 0.1, num_draws=NUM_DRAWS),
        f"IRT K={NUM_DRAWS} two-sided": lambda: irt(test, sampler, 0.1, NUM_DRAWS, two_sided=True),
    }.items():
        result, seconds = timed(run)
        print(f"{name:<24}{result.model_calls:>14}{seconds:>10.3f}")

    # Scoring only: the same counterfactuals scored in one batch stream, per feature, per input.
    gen = seeded_generator(0)
    cf = torch.stack([draw_feature(test, sampler, j, 1, gen) for j in range(NUM_FEATURES)])
    d, k, n = cf.shape[:3]
    instance = torch.arange(n).expand(d, k, n)
    fn = test.score_fn
    ways = {
        "batched (4096 rows/call)": lambda: score_batched(
            fn, cf.flatten(0, 2), instance.flatten(), 4096
        ),
        "loop over features": lambda: [
            score_batched(fn, cf[j].flatten(0, 1), instance[j].flatten(), n * k) for j in range(d)
        ],
        "loop over inputs": lambda: [
            fn(row[None], i[None])
            for row, i in zip(cf.flatten(0, 2), instance.flatten(), strict=True)
        ],
    }
    print(f"\nscoring {d * k * n} one-shot counterfactuals")
    base = None
    for name, way in ways.items():
        with torch.no_grad():
            _, seconds = timed(way)
        base = base or seconds
        print(f"{name:<26}{seconds:>10.4f} s   ({seconds / base:.1f}x the batched time)")


if __name__ == "__main__":
    main()
