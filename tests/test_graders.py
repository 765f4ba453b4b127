"""The SePT reference grader (data.checker.compare=sept) and re-scoring stored samples."""

import json
from pathlib import Path

import pytest
from hydra.utils import instantiate

from osftkit.results.rescore import main, read_samples, rescore
from osftkit.rewards import AnswerChecker
from osftkit.rewards.reference_grader import hendrycks_normalise, reference_equal, sympy_equal
from osftkit.rewards.verify import math_equal
from tests.conftest import compose_config

FIXTURE = Path(__file__).parent / "data" / "math500_style_answers.jsonl"
ROWS = [json.loads(line) for line in FIXTURE.read_text().splitlines()]


@pytest.mark.parametrize(
    ("answer", "normalised"),
    [
        (r"\dfrac12", r"\frac{1}{2}"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        (r"10 \text{ cm}", "10"),
        (r"x = 5", "5"),
        (r"90^\circ", "90"),
        ("0.5", r"\frac{1}{2}"),
        ("3/4", r"\frac{3}{4}"),
    ],
)
def test_hendrycks_normalisation(answer: str, normalised: str) -> None:
    assert hendrycks_normalise(answer) == normalised


def test_the_sympy_step_is_strict_where_the_reference_is() -> None:
    assert sympy_equal("7 3/4", r"\frac{31}{4}")  # a mixed number
    assert sympy_equal("5 dollars", "5")
    assert not sympy_equal("2/4", r"\frac{1}{2}")  # an unreduced fraction is not the answer
    assert not sympy_equal(r"\frac{8}{2}", "4")  # an integer gold needs an integer
    assert not sympy_equal("[1, 2]", "(1, 2]")  # an interval's brackets count
    assert sympy_equal("(1, 2]", "(1,2]")


def test_a_runaway_expression_is_wrong_not_a_hang() -> None:
    assert not reference_equal("9^{9^{9^{9^{9}}}}", "1")


def test_the_reference_grader_accepts_what_math_verify_misses() -> None:
    for answer, gold in (
        ("5 dollars", "5"),
        ("7 3/4", r"\frac{31}{4}"),
        (r"\text{10 inches}", "10"),
    ):
        assert reference_equal(answer, gold) and not math_equal(answer, gold)


def test_graders_on_the_math500_style_fixture() -> None:
    """Both graders against a human reading of 50 answer pairs: the reference grader is right
    on every pair math-verify is right on, and on three more."""
    sept = [reference_equal(r["answer"], r["gold"]) == r["equivalent"] for r in ROWS]
    verify = [math_equal(r["answer"], r["gold"]) == r["equivalent"] for r in ROWS]
    assert all(s for s, v in zip(sept, verify, strict=True) if v)
    assert sum(sept) - sum(verify) == 3


def test_the_checker_option_composes_and_scores() -> None:
    checker = instantiate(
        compose_config(["data=math500", "data.checker.compare=sept"]).data.checker
    )
    assert checker.score([r"so \boxed{5 dollars}", r"\boxed{6}"], ["5", "5"]) == [True, False]


def test_rescore_reports_agreement_and_disagreements(tmp_path: Path) -> None:
    samples = [
        {
            "problem_id": "a",
            "sample": 0,
            "response": r"\boxed{5 dollars}",
            "gold": "5",
            "answer": "5 dollars",
            "correct": False,
        },
        {
            "problem_id": "b",
            "sample": 0,
            "response": r"\boxed{4}",
            "gold": "4",
            "answer": "4",
            "correct": True,
        },
        {
            "problem_id": "c",
            "sample": 0,
            "response": r"\boxed{3}",
            "gold": "4",
            "answer": "3",
            "correct": False,
        },
    ]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    result = rescore(read_samples(path), AnswerChecker(compare="sept"))
    assert (result.total, result.agree, result.only_first, result.only_second) == (3, 2, 0, 1)
    assert [d["problem_id"] for d in result.disagreements] == ["a"]
    assert main([str(path), "--grader", "sept"]) == 0


def test_rescore_names_a_bad_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"response": "x", "gold": "1"}) + "\n")
    assert main([str(path)]) == 1
    assert "line 1: missing ['correct']" in capsys.readouterr().err


def arithmetic_samples(size: int) -> list[dict]:
    """Responses on the offline arithmetic set: each problem's noisy-calculator solution (a
    perturbed answer about 40% of the time) and its true answer written in a varied format."""
    from osftkit.data.arithmetic import build_arithmetic

    clean = build_arithmetic("val", size, seed=0)
    noisy = build_arithmetic("val", size, seed=0, label_noise=0.15)
    formats = ("{n}", "{n}.0", "{n} units", r"\text{{{n}}}", "0{n}", "+{n}", r"{n}\%")
    samples = []
    for i, (row, perturbed) in enumerate(zip(clean, noisy, strict=True)):
        written = formats[i % len(formats)].format(n=row["answer"])
        for response in (perturbed["solution"], rf"so \boxed{{{written}}}"):
            samples.append({"response": response, "gold": row["answer"]})
    return samples


def test_graders_agree_on_the_arithmetic_set() -> None:
    samples = arithmetic_samples(64)
    responses, golds = [s["response"] for s in samples], [s["gold"] for s in samples]
    stored = AnswerChecker(compare="math").score(responses, golds)
    for sample, correct in zip(samples, stored, strict=True):
        sample["correct"] = correct
    result = rescore(samples, AnswerChecker(compare="sept"))
    assert result.total == 128 and result.agree == 128
    assert 64 < sum(stored) < 128  # the perturbed answers are a real mix of right and wrong
