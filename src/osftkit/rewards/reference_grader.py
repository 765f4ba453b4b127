"""The reference grader of the Online SFT paper's code (SePT, verl's `entropy_math`), rewritten:
an answer is right if it matches the gold after Hendrycks-style normalisation, or if sympy finds
the two equal (element by element for tuples and intervals) within a time limit, or if
math-verify does.

Like the reference, the sympy step is strict where a lenient check would flatter: an integer gold
needs an integer answer (no simplification), and two plain fractions must match as written (an
unreduced fraction is wrong). Expressions that could hold sympy for ever (towers of powers, more
than two unknown letters) are not given to it.
"""

import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import sympy
from sympy.parsing import sympy_parser

from osftkit.rewards.comparators import math_equal

# Words that name units or objects after a number; removed before comparing.
UNIT_WORDS = (
    "degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week",
    "month", "year", "foot", "feet", "inch", "yard", "unit", "dollar", "cent", "point",
)  # fmt: skip
UNIT_PATTERN = re.compile(rf"\b({'|'.join(UNIT_WORDS)})(e?s)?\b *(\^[0-9]+)?")
TEXT_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{(?P<inner>.+?)\}$")
TRAILING_TEXT = re.compile(r"\\(?:text|mbox)\{.*?\}$")
THOUSANDS = re.compile(r"(\d),(\d\d\d)($|\D)")
FRACTION = re.compile(r"^-?[0-9]+/0*[1-9][0-9]*$")
UNSAFE = (
    re.compile(r"\^\{"),
    re.compile(r"\^\("),
    re.compile(r"\^[0-9]+\^"),
    re.compile(r"\^[0-9]{2,}"),
)
BRACKETS = "()[]"


class GraderTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise GraderTimeout after `seconds` (SIGALRM: only in the main thread; elsewhere no limit,
    as math-verify does)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise GraderTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def braced_fractions(text: str) -> str:
    r"""\frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72} (shorthand TeX)."""
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", text)
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text)


def hendrycks_normalise(answer: str) -> str:
    """The MATH data set's string normalisation: spacing, \\left/\\right, dfrac, units in
    \\text{}, degrees, dollars, percent, a leading 'x =', 0.5 -> 1/2, a/b -> \\frac{a}{b}."""
    text = answer.strip()
    wrapped = TEXT_WRAPPER.match(text)
    text = wrapped["inner"].strip() if wrapped else text
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac")):
        text = text.replace(old, new)
    for old in ("\\left", "\\right", "^{\\circ}", "^\\circ", "\\$", "\\%", "%", "$"):
        text = text.replace(old, "")
    stripped = TRAILING_TEXT.sub("", text).strip()  # "5 \text{ cm}" -> "5"
    text = stripped or text
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    text = "0" + text if text.startswith(".") else text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2:  # "x = 5" -> "5"
        text = sides[1]
    text = braced_fractions(text.replace(" ", ""))
    if text == "0.5":
        text = "\\frac{1}{2}"
    plain = re.fullmatch(r"(-?\d+)/(\d+)", text)
    return f"\\frac{{{plain[1]}}}{{{plain[2]}}}" if plain else text


def latex_to_plain(text: str) -> str:
    """LaTeX fractions, roots and symbols as plain expressions sympy's parser reads."""
    text = braced_fractions(text)
    text = re.sub(r"\\frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", text)  # a plain fraction stays a/b
    for _ in range(3):  # nested fractions, innermost first
        text = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", text)
    text = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", text)
    for old, new in (("\\pi", "pi"), ("\\infty", "oo"), ("\\cdot", "*"), ("\\times", "*")):
        text = text.replace(old, new)
    return text.replace("\\", "")


def sympy_normalise(answer: str) -> str:
    """The PRM800K-style normalisation the sympy step compares: units and words removed, LaTeX
    turned into a plain expression, lower case, integers in canonical form."""
    text = answer.strip()
    wrapped = TEXT_WRAPPER.match(text)
    text = wrapped["inner"] if wrapped else text
    for old, new in (("\\%", ""), ("\\$", ""), ("$", ""), ("%", ""), (" or ", ","), (" and ", ",")):
        text = text.replace(old, new)
    for word, power in (("million", "6"), ("billion", "9"), ("trillion", "12")):
        text = text.replace(word, f"*10^{power}")
    text = UNIT_PATTERN.sub("", TRAILING_TEXT.sub("", text) or text)
    text = re.sub(r"\^ *\{?\\circ\}?", "", text)
    if len(text) > 1 and text[0] == "{" and text[-1] == "}":
        text = text[1:-1]
    text = latex_to_plain(text) if "\\" in text else text
    text = re.sub(r"- *", "-", text)
    text = re.sub(r"([0-9]) +([0-9])", r"\1+\2", text)  # a mixed number 7 3/4 -> 7+3/4
    text = text.replace(" ", "").replace("{", "").replace("}", "").lower()
    integer = as_integer(text)
    return str(integer) if integer is not None else text


def as_integer(text: str) -> int | None:
    try:
        value = float(strip_thousands(text))
    except ValueError:
        return None
    return int(round(value)) if abs(value - round(value)) <= 1e-7 else None


def strip_thousands(text: str) -> str:
    while (next_text := THOUSANDS.sub(r"\1\2\3", text)) != text:
        text = next_text
    return text


def elements(text: str) -> list[str]:
    """The elements of a tuple or interval '(a, b]' (thousands separators kept whole)."""
    text = strip_thousands(text)
    inner = text[1:-1]
    bracketed = len(text) > 2 and text[0] in BRACKETS and text[-1] in BRACKETS
    if bracketed and not any(ch in inner for ch in BRACKETS):
        return [part.strip() for part in inner.split(",")]
    return [text] if text else []


def safe_for_sympy(expression: str) -> bool:
    letters = {ch for ch in expression.replace("sqrt", "").replace("frac", "") if ch.isalpha()}
    return len(letters) <= 2 and not any(p.search(expression) for p in UNSAFE)


def sympy_difference_is_zero(gold: str, prediction: str, timeout_s: int) -> bool:
    expression = f"({gold})-({prediction})"
    if not safe_for_sympy(expression):
        return False
    transformations = sympy_parser.standard_transformations + (
        sympy_parser.implicit_multiplication_application,
    )
    try:
        with time_limit(timeout_s):
            parsed = sympy_parser.parse_expr(
                expression.replace("^", "**"), transformations=transformations
            )
            return sympy.simplify(parsed) == 0
    except Exception:  # unparsable, or GraderTimeout: not shown equal
        return False


def sympy_equal(prediction: str, gold: str, timeout_s: int = 1) -> bool:
    """Equal after sympy normalisation, element by element, with the reference's strictness."""
    gold_text, given = sympy_normalise(gold), sympy_normalise(prediction)
    if gold_text == given:
        return True
    gold_parts, given_parts = elements(gold_text), elements(given)
    if not given or len(gold_parts) != len(given_parts):
        return False
    if len(gold_parts) > 1 and (gold_text[0], gold_text[-1]) != (given[0], given[-1]):
        return False  # an interval's brackets must match: (1, 2] is not [1, 2]
    return all(element_equal(g, p, timeout_s) for g, p in zip(gold_parts, given_parts, strict=True))


def element_equal(gold: str, given: str, timeout_s: int) -> bool:
    if FRACTION.match(gold) and FRACTION.match(given):
        return gold == given  # an unreduced fraction is not the answer
    if (as_integer(gold) is None) != (as_integer(given) is None):
        return False  # an integer gold needs an integer answer, not something that simplifies to it
    return sympy_difference_is_zero(gold, given, timeout_s)


def reference_equal(prediction: str, gold: str, timeout_s: int = 1) -> bool:
    """SePT's grader: Hendrycks normalisation, then sympy, then math-verify."""
    if hendrycks_normalise(prediction) == hendrycks_normalise(gold):
        return True
    return sympy_equal(prediction, gold, timeout_s) or math_equal(prediction, gold, timeout_s)
