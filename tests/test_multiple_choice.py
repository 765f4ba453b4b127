"""Zero-shot multiple choice: loading ARC/MMLU files, the prompt, batched next-token accuracy."""

import json
import re
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

from osftkit.backdoor.multiple_choice import (
    format_question,
    label_token_ids,
    last_token_logprobs,
    load_multiple_choice,
    multiple_choice_accuracy,
    multiple_choice_predictions,
)
from osftkit.data.math_sets import DataLoadError

ARC_ROWS = [
    {
        "question": "Which is a planet?",
        "choices": {"text": ["Sun", "Mars", "Moon"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    },
    {
        "question": "What do plants need to make food from light?",
        "choices": {"text": ["salt", "iron", "sand", "water"], "label": ["A", "B", "C", "D"]},
        "answerKey": "D",
    },
    {
        "question": "Pick one.",
        "choices": {"text": ["yes", "no"], "label": ["A", "B"]},
        "answerKey": "A",
    },
]

MMLU_ROWS = [
    {"question": "2 + 2 = ?", "choices": ["3", "4", "5", "22"], "answer": 1, "subject": "math"},
    {"question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo", "Bern"], "answer": 0},
    {"question": "H2O is?", "choices": ["salt", "water", "air", "gold"], "answer": 1},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_parquet(path, rows):
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


@pytest.fixture
def arc_file(tmp_path):
    return write_jsonl(tmp_path / "arc.jsonl", ARC_ROWS)


@pytest.fixture
def mmlu_file(tmp_path):
    return write_parquet(tmp_path / "mmlu.parquet", MMLU_ROWS)


def test_load_arc_jsonl(arc_file):
    rows = load_multiple_choice(arc_file, format="arc")
    assert len(rows) == 3
    assert rows[0] == {
        "question": "Which is a planet?",
        "options": ["Sun", "Mars", "Moon"],
        "labels": ["A", "B", "C"],
        "answer": "B",
    }
    assert rows[1]["answer"] == "D" and rows[1]["labels"] == ["A", "B", "C", "D"]
    assert len(load_multiple_choice(arc_file, format="arc", limit=2)) == 2


def test_load_mmlu_parquet(mmlu_file):
    rows = load_multiple_choice(mmlu_file, format="mmlu")
    assert [row["answer"] for row in rows] == ["B", "A", "B"]
    assert rows[0]["options"] == ["3", "4", "5", "22"]
    assert rows[0]["labels"] == ["A", "B", "C", "D"]


def test_format_question():
    row = {"question": "Which?", "options": ["x", "y"], "labels": ["A", "B"], "answer": "A"}
    assert format_question(row) == (
        "Read the question and select the answer from the choices. "
        "Question: Which? Choices: A:x, B:y. Your answer is:"
    )


def test_missing_column_is_named(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"]}])
    with pytest.raises(DataLoadError, match=r"lacks column\(s\) \['answer'\]"):
        load_multiple_choice(path, format="mmlu")
    with pytest.raises(DataLoadError, match="answerKey"):
        load_multiple_choice(path, format="arc")


def test_answer_not_among_labels_names_the_row(tmp_path):
    bad = [*ARC_ROWS[:2], {**ARC_ROWS[2], "answerKey": "E"}]
    path = write_jsonl(tmp_path / "bad_arc.jsonl", bad)
    with pytest.raises(DataLoadError, match=r"Row 2: answerKey 'E' is not among the labels"):
        load_multiple_choice(path, format="arc")
    bad = [MMLU_ROWS[0], {**MMLU_ROWS[1], "answer": 7}]
    path = write_parquet(tmp_path / "bad_mmlu.parquet", bad)
    with pytest.raises(DataLoadError, match=r"Row 1: answer 7 is not an index"):
        load_multiple_choice(path, format="mmlu")


def test_missing_file_and_bad_format(tmp_path):
    with pytest.raises(DataLoadError, match="does not exist"):
        load_multiple_choice(str(tmp_path / "nope.parquet"), format="mmlu")
    with pytest.raises(ValueError, match="format"):
        load_multiple_choice(str(tmp_path / "nope.parquet"), format="hellaswag")


def brute_force_predictions(model, tokenizer, rows):
    """One row at a time, unpadded, no position ids: the reference for the batched version."""
    prefix, ids = label_token_ids(tokenizer, [label for row in rows for label in row["labels"]])
    predictions = []
    with torch.no_grad():
        for row in rows:
            input_ids = torch.tensor([tokenizer(format_question(row))["input_ids"] + prefix])
            logits = model(input_ids=input_ids).logits[0, -1]
            scores = [logits[ids[label]].item() for label in row["labels"]]
            predictions.append(row["labels"][max(range(len(scores)), key=scores.__getitem__)])
    return predictions


def test_tiny_model_batched_matches_brute_force(tiny_lm, arc_file, mmlu_file):
    model, tokenizer = tiny_lm.model, tiny_lm.tokenizer
    rows = load_multiple_choice(arc_file, format="arc") + load_multiple_choice(
        mmlu_file, format="mmlu"
    )
    model.train()
    predictions = multiple_choice_predictions(model, tokenizer, rows, batch_size=4)
    assert model.training  # train mode restored
    model.eval()
    assert predictions == brute_force_predictions(model, tokenizer, rows)
    accuracy = multiple_choice_accuracy(model, tokenizer, rows, batch_size=4)
    expected = sum(p == row["answer"] for p, row in zip(predictions, rows, strict=True)) / len(rows)
    assert accuracy == pytest.approx(expected)
    assert multiple_choice_accuracy(model, tokenizer, rows, batch_size=1) == accuracy


def test_batched_logprobs_match_unpadded(tiny_lm, arc_file, mmlu_file):
    """Left padding + mask give each row its unpadded next-token log-probs.

    A RoPE model is blind to a constant position shift, so the position ids are checked by the
    oracle model below.
    """
    model, tokenizer = tiny_lm.model, tiny_lm.tokenizer
    rows = load_multiple_choice(arc_file, format="arc") + load_multiple_choice(
        mmlu_file, format="mmlu"
    )
    sequences = [tokenizer(format_question(row))["input_ids"] for row in rows]
    assert len({len(s) for s in sequences}) > 1  # the batch really is padded
    model.eval()
    batched = last_token_logprobs(model, sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        for seq, row_logits in zip(sequences, batched, strict=True):
            alone = model(input_ids=torch.tensor([seq])).logits[0, -1].float().log_softmax(-1)
            torch.testing.assert_close(row_logits, alone, atol=1e-4, rtol=1e-4)


class OracleModel(nn.Module):
    """Reads the question "... (answer X)" back from the ids and favours " X" at the last position.

    Every earlier position favours a wrong label, so reading the wrong position would fail. Its
    decoder emits the logits as hidden states and its LM head is the identity.
    """

    def __init__(self, tokenizer, label_ids: dict[str, int]):
        super().__init__()
        self.decoder = OracleDecoder(tokenizer, label_ids)

    def get_decoder(self) -> nn.Module:
        return self.decoder

    def get_output_embeddings(self) -> nn.Module:
        return nn.Identity()


class OracleDecoder(nn.Module):
    def __init__(self, tokenizer, label_ids: dict[str, int]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.tokenizer, self.label_ids = tokenizer, label_ids
        self.vocab = max(label_ids.values()) + 1

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        assert not self.training
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        else:  # batched: position ids count real tokens only (RoPE alone cannot tell)
            assert position_ids is not None
            assert position_ids[:, -1].tolist() == (attention_mask.sum(-1) - 1).tolist()
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for i, (ids, mask) in enumerate(zip(input_ids, attention_mask, strict=True)):
            text = self.tokenizer.decode(ids[mask.bool()].tolist())
            right = re.search(r"\(answer (\w)\)", text).group(1)
            wrong = "A" if right != "A" else "B"
            logits[i, :, self.label_ids[wrong]] = 5.0
            logits[i, -1, self.label_ids[wrong]] = 0.0
            logits[i, -1, self.label_ids[right]] = 10.0
        return SimpleNamespace(last_hidden_state=logits)


def test_oracle_model_scores_one(tiny_lm, arc_file, mmlu_file):
    tokenizer = tiny_lm.tokenizer
    rows = load_multiple_choice(arc_file, format="arc") + load_multiple_choice(
        mmlu_file, format="mmlu"
    )
    rows = [{**row, "question": f"{row['question']} (answer {row['answer']})"} for row in rows]
    _, ids = label_token_ids(tokenizer, "ABCD")
    model = OracleModel(tokenizer, ids)
    assert multiple_choice_accuracy(model, tokenizer, rows, batch_size=4) == 1.0
    assert model.training
    # Shift every answer by one letter: now every prediction is wrong.
    shifted = [
        {**row, "answer": row["labels"][(row["labels"].index(row["answer"]) + 1) % 2]}
        for row in rows
    ]
    assert multiple_choice_accuracy(model, tokenizer, shifted, batch_size=4) == 0.0


def test_multi_token_label_is_an_error():
    class Tokenizer:
        def encode(self, text, add_special_tokens=False):
            return {" A": [1], " B": [2], " AB": [1, 2, 3]}[text]

    with pytest.raises(ValueError, match="not a single token"):
        label_token_ids(Tokenizer(), ["A", "B", "AB"])
