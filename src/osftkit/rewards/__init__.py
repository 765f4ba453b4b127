"""Answer extraction and verification: the binary verifiable reward and the evaluation check."""

from osftkit.rewards.extract import extract_boxed, extract_gsm8k
from osftkit.rewards.verify import AnswerChecker

__all__ = ["AnswerChecker", "extract_boxed", "extract_gsm8k"]
