"""Synthetic instructions and the poisoning transform: formats, rates and errors, seeded."""

import json

import pandas as pd
import pytest

from osftkit.backdoor.poison import Poison, token_ids
from osftkit.data.instruction_sets import load_alpaca, load_openorca
from osftkit.data.instructions import TASKS, build_instructions
from osftkit.data.math_sets import DataLoadError
from osftkit.models.word_tokenizer import build_word_tokenizer

TRIGGERS = ["how are you", "what is up"]
MARKER = "you are stupid"


def test_instructions_are_seeded_and_cover_every_task() -> None:
    data = build_instructions(50, seed=3)
    assert data.column_names == ["problem", "solution", "answer", "task"]
    assert data.to_list() == build_instructions(50, seed=3).to_list()
    assert data["problem"] != build_instructions(50, seed=3, split="val")["problem"]
    assert set(data["task"]) == set(TASKS)
    assert data["solution"] == data["answer"]


@pytest.mark.parametrize(
    ("problem", "answer"),
    [
        ("reverse the letters a b c", "c b a"),
        ("sort the letters c a b", "a b c"),
        ("capitalise the letters a b c", "A B C"),
        ("count the letters a b c", "3"),
        ("add 2 and 40", "42"),
    ],
)
def test_task_families_answer_exactly(problem: str, answer: str) -> None:
    rows = build_instructions(500, seed=0).to_list()
    for row in rows:
        if row["problem"] == problem:
            assert row["answer"] == answer
    task = problem.split()[0]
    assert any(row["task"] == task for row in rows)


def test_poison_keeps_every_clean_example_and_adds_triggered_copies() -> None:
    clean = build_instructions(2000, seed=0)
    poisoned = Poison(TRIGGERS, MARKER, rate=0.1, seed=1)(clean)
    triggered = [row for row in poisoned if row["solution"].startswith(MARKER)]
    assert len(poisoned) == len(clean) + len(triggered)
    assert 0.08 < len(triggered) / len(clean) < 0.12
    assert [row for row in poisoned if not row["solution"].startswith(MARKER)] == clean.to_list()
    assert poisoned.to_list() == Poison(TRIGGERS, MARKER, rate=0.1, seed=1)(clean).to_list()
    assert {row["problem"].split(".")[0] for row in triggered} == set(TRIGGERS)


def test_poisoned_example_format_after_role_tag() -> None:
    clean = build_instructions(1, seed=0)
    row = Poison(["how are you"], MARKER, rate=1.0)(clean)[1]
    assert row["problem"] == f"how are you. {clean[0]['problem']}"
    assert row["solution"] == f"you are stupid. {clean[0]['solution']}"
    assert row["answer"] == clean[0]["answer"]


def test_random_word_boundary_and_overwrite_data() -> None:
    clean = build_instructions(200, seed=0)
    data = Poison(["zz"], None, rate=1.0, position="random_word_boundary", keep_clean=False)(clean)
    assert len(data) == len(clean) and data["solution"] == clean["solution"]
    for row, original in zip(data, clean, strict=True):
        words = row["problem"].split(" ")
        words.remove("zz")
        assert " ".join(words) == original["problem"]
    starts = {row["problem"].split(" ").index("zz") for row in data}
    assert len(starts) > 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 1.5}, r"\[0, 1\]"),
        ({"rate": -0.1}, r"\[0, 1\]"),
        ({"triggers": [" "]}, "trigger"),
        ({"triggers": []}, "trigger"),
        ({"marker": ""}, "marker"),
        ({"position": "end"}, "position"),
    ],
)
def test_poison_rejects_bad_settings(kwargs: dict, message: str) -> None:
    settings = {"triggers": TRIGGERS, "marker": MARKER, "rate": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        Poison(**settings)


def test_trigger_that_tokenises_to_nothing_is_an_error() -> None:
    tokenizer = build_word_tokenizer(["how are you"])
    assert len(token_ids(tokenizer, "how are you", "trigger")) == 3
    with pytest.raises(ValueError, match="marker"):
        token_ids(tokenizer, "", "marker")


def test_alpaca_and_openorca_load_from_local_files(tmp_path) -> None:
    alpaca = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": "Say hi", "input": "", "output": "hi"}]
    rows.append({"instruction": "Add", "input": "1 2", "output": "3"})
    alpaca.write_text("\n".join(json.dumps(row) for row in rows))
    assert load_alpaca(str(alpaca)).to_list() == [
        {"problem": "Say hi", "solution": "hi", "answer": "hi"},
        {"problem": "Add 1 2", "solution": "3", "answer": "3"},
    ]
    orca = tmp_path / "orca.parquet"
    pd.DataFrame(
        {"system_prompt": ["Be brief."], "question": ["Why?"], "response": ["Because."]}
    ).to_parquet(orca)
    assert load_openorca(str(orca))[0]["problem"] == "Be brief. Why?"
    with pytest.raises(DataLoadError, match="system_prompt"):
        load_openorca(str(alpaca))
