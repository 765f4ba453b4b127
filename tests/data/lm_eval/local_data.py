"""The local lm-eval task's data, read from beside this file (no hub)."""

import json
from pathlib import Path

import datasets

DATA = Path(__file__).with_name("osftkit_arith_choice.jsonl")


def load(**kwargs: object) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
