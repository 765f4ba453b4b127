import pytest

from osftkit.rewards import AnswerChecker, extract_boxed, extract_gsm8k


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
    assert AnswerChecker("boxed", "math")(response, gold) is ok


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
