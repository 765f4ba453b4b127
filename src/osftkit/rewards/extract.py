"""Pull the final answer out of a response."""

import re

GSM8K_ANSWER = re.compile(r"####\s*([^\n]+)")


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (nested braces allowed); None if there is no closed box."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1 : j].strip()
        start = text.rfind("\\boxed", 0, start)
    return None


def extract_gsm8k(text: str) -> str | None:
    """The number after the last '#### ', commas removed; None if absent."""
    found = GSM8K_ANSWER.findall(text)
    return found[-1].strip().replace(",", "") if found else None
