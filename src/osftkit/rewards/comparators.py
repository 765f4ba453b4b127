"""Answer comparisons below both graders: exact match and math-verify's equivalence."""


def exact_match(prediction: str, gold: str, timeout_s: int = 1) -> bool:
    return prediction.strip() == gold.strip()


def math_equal(prediction: str, gold: str, timeout_s: int = 1) -> bool:
    """LaTeX-aware equivalence with math-verify (\\frac{1}{2} == 0.5), exact match as a fallback.
    Parsing and comparing each stop after `timeout_s` seconds (an answer such as
    9^{9^{9^{9^{9}}}} would hold sympy for ever): that answer is scored wrong."""
    if exact_match(prediction, gold):
        return True
    from math_verify import parse, verify

    try:
        parsed_gold = parse(f"${gold}$", parsing_timeout=timeout_s)
        parsed = parse(f"${prediction}$", parsing_timeout=timeout_s)
        return bool(verify(parsed_gold, parsed, timeout_seconds=timeout_s))
    except Exception:  # math-verify raises on unparsable LaTeX: that answer is simply wrong
        return False
