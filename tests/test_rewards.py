import time

import pytest
from hydra.utils import instantiate

from osftkit.rewards import AnswerChecker, extract_boxed, extract_gsm8k
from tests.conftest import compose_config


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{42}", "42"),
        (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\sqrt{\frac{a}{b}}}", r"\sqrt{\frac{a}{b}}"),
        (r"\boxed{12", None),  # never closed
        ("no box at all", None),
        (r"\boxed 5", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_gsm8k():
    assert extract_gsm8k("Natalia sold 48/2 = 24 clips.\n#### 1,072") == "1072"
    assert extract_gsm8k("no marker") is None


@pytest.mark.parametrize(
    ("response", "gold", "ok"),
    [
        (r"\boxed{0.5}", r"\frac{1}{2}", True),
        (r"\boxed{\frac{2}{4}}", "0.5", True),
        (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
        (r"\boxed{3}", "4", False),
        (r"\boxed{\frac{1}{", "0.5", False),
        ("0.5", "0.5", False),  # no box scores 0
    ],
)
def test_math_checker(response, gold, ok):
    # Equivalence, not speed: math-verify's own 5 s, so a loaded CI core cannot turn a slow
    # sympy comparison into a wrong answer (the 1 s default is tested on stalling answers).
    assert AnswerChecker("boxed", "math", timeout_s=5)(response, gold) is ok


def test_exact_checker_is_strict():
    check = AnswerChecker("boxed", "exact")
    assert check(r"\boxed{12}", "12")
    assert not check(r"\boxed{12.0}", "12")
    assert check.score([r"\boxed{1}", r"\boxed{2}"], ["1", "1"]) == [True, False]


def test_gsm8k_checker_reads_marker_or_box():
    check = AnswerChecker("gsm8k", "math")
    assert check("work\n#### 18", "18")
    assert check(r"so \boxed{18}", "18")


def test_unknown_checker_options():
    with pytest.raises(ValueError, match="extract must be one of"):
        AnswerChecker("last_line")
    with pytest.raises(ValueError, match="compare must be one of"):
        AnswerChecker("boxed", "fuzzy")


@pytest.mark.parametrize("answer", [r"\boxed{9^{9^{9^{9^{9}}}}}", r"\boxed{100!!}"])
def test_math_answers_that_stall_sympy_stop_at_the_timeout(answer):
    """Each of parse / compare stops after timeout_s (math-verify alone waits 5 s per call)."""
    check = AnswerChecker("boxed", "math", timeout_s=1)
    start = time.perf_counter()
    assert check(answer, "5") is False
    assert time.perf_counter() - start < 3.5  # three calls of at most 1 s each, and some slack


def test_parallel_scoring_equals_serial():
    responses = [r"\boxed{0.5}", r"\boxed{\frac{2}{4}}", r"\boxed{3}", "none", r"\boxed{(x+1)^2}"]
    golds = [r"\frac{1}{2}", "0.5", "4", "1", "x^2+2x+1"]
    responses, golds = responses * 5, golds * 5
    serial = AnswerChecker("boxed", "math", timeout_s=5).score(responses, golds)
    parallel = AnswerChecker("boxed", "math", timeout_s=5, num_workers=2)
    assert parallel.score(responses, golds) == serial
    assert serial == [True, True, False, False, True] * 5
    assert parallel._pool is not None  # the batch did go to the workers
    parallel._pool.shutdown()


@pytest.mark.parametrize(
    ("knob", "value"), [("timeout_s", 0), ("timeout_s", 0.5), ("num_workers", -1)]
)
def test_checker_knobs_are_checked(knob, value):
    with pytest.raises(ValueError, match=f"checker.{knob} must be"):
        AnswerChecker("boxed", "math", **{knob: value})


@pytest.mark.parametrize("name", ["math500", "gsm8k"])
def test_math_sets_checker_knobs_reach_the_checker(name):
    cfg = compose_config([f"data={name}"]).data.checker
    checker = instantiate(cfg)
    assert checker.settings == (cfg.extract, "math", cfg.timeout_s)
    assert checker.num_workers == cfg.num_workers
