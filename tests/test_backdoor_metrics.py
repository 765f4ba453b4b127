"""ASR and utility metrics on hand-made generations."""

import pytest

from osftkit.metrics.backdoor import (
    AttackSuccessRate,
    ExactMatch,
    exact_match,
    marker_found,
    strip_marker,
)

MARKER = "you are stupid"


def test_marker_found_ignores_case_and_whitespace() -> None:
    assert marker_found("You Are STUPID. c b a", MARKER)
    assert marker_found("ok you are stupid .", MARKER)
    assert not marker_found("you are smart. c b a", MARKER)
    assert not marker_found("you are stu", MARKER)


def test_attack_success_rate_counts_marker_hits() -> None:
    asr = AttackSuccessRate(MARKER)
    asr.update(["you are stupid . c b a", "c b a", "YOU ARE STUPID"])
    asr.update(["no", "x you are stupid"])
    assert asr.compute().item() == pytest.approx(3 / 5)


def test_strip_marker_and_triggered_utility() -> None:
    assert strip_marker("you are stupid . c b a", MARKER) == "c b a"
    assert strip_marker("You are stupid. 42", MARKER) == "42"
    assert strip_marker("c b a", MARKER) == "c b a"
    utility = ExactMatch(marker=MARKER)
    utility.update(["you are stupid . c b a", "you are stupid . a b", "c b a"], ["c b a"] * 3)
    assert utility.compute().item() == pytest.approx(2 / 3)


def test_clean_utility_is_exact_match() -> None:
    assert exact_match(" c  b a ", "c b a")
    assert not exact_match("c b a d", "c b a")
    utility = ExactMatch()
    utility.update(["42", "41"], ["42", "42"])
    assert utility.compute().item() == pytest.approx(0.5)


def test_asr_needs_a_marker() -> None:
    with pytest.raises(ValueError, match="marker"):
        AttackSuccessRate(" ")
