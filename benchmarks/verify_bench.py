"""Serial vs parallel math verification of a validation-sized batch (prints figures only).

`PYTHONPATH=src python benchmarks/verify_bench.py --problems 500 --samples 8 --workers 2`:
answers in the forms models write (fractions, decimals, expressions, wrong values), a share of
them ones that stall sympy until the timeout (`100!!`, towers of powers)."""

import argparse
import random
import time

from osftkit.rewards import AnswerChecker

STALLING = [r"\boxed{100!!}", r"\boxed{9^{9^{9^{9^{9}}}}}"]


def batch(problems: int, samples: int, stall_share: float, seed: int) -> tuple[list, list]:
    """(responses, golds): each problem's gold p/q, its samples right, rewritten, or wrong."""
    rng = random.Random(seed)
    responses, golds = [], []
    for _ in range(problems):
        p, q = rng.randint(1, 9), rng.randint(2, 9)
        for _ in range(samples):
            form = rng.choice(
                [
                    rf"\frac{{{p}}}{{{q}}}",
                    rf"\frac{{{2 * p}}}{{{2 * q}}}",
                    f"{p / q:.6f}",
                    f"{p + q}",
                ]
            )
            stall = rng.random() < stall_share
            responses.append(rng.choice(STALLING) if stall else rf"so \boxed{{{form}}}")
            golds.append(rf"\frac{{{p}}}{{{q}}}")
    return responses, golds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stall-share", type=float, default=0.005)
    parser.add_argument("--timeout", type=int, default=1)
    args = parser.parse_args()
    responses, golds = batch(args.problems, args.samples, args.stall_share, seed=0)
    serial = AnswerChecker("boxed", "math", timeout_s=args.timeout)
    parallel = AnswerChecker("boxed", "math", args.timeout, num_workers=args.workers)
    parallel.score(responses[: args.workers * 2], golds[: args.workers * 2])  # start the workers
    start = time.perf_counter()
    expected = serial.score(responses, golds)
    serial_s = time.perf_counter() - start
    start = time.perf_counter()
    got = parallel.score(responses, golds)
    parallel_s = time.perf_counter() - start
    print(
        f"{len(responses)} answers, {sum(r in STALLING for r in responses)} stalling; "
        f"timeout {args.timeout} s; {sum(expected)} correct; results equal: {got == expected}"
    )
    print(
        f"serial {serial_s:.1f} s, {args.workers} workers {parallel_s:.1f} s, "
        f"ratio {serial_s / parallel_s:.2f}"
    )


if __name__ == "__main__":
    main()
