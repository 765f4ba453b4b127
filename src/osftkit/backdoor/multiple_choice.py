"""Zero-shot multiple choice (ARC, MMLU) from local files: the answer letter by next-token argmax.

A clean-utility check for real models: format each question with the SANDE reference's
template,

    Read the question and select the answer from the choices. Question: ... Choices: A:...,
    B:..., C:..., D:.... Your answer is:

and take the argmax of the next-token logits restricted to the label tokens (" A", " B", ...,
tokenised with their leading space). Accuracy is the fraction of rows whose argmax label is the
answer. Rows are batched with left padding, an attention mask and position ids from the mask,
so batching does not change a row's prediction.

    from osftkit.backdoor.multiple_choice import load_multiple_choice, multiple_choice_accuracy
    rows = load_multiple_choice("/data/arc_challenge_test.parquet", format="arc", limit=500)
    acc = multiple_choice_accuracy(model, tokenizer, rows, batch_size=16)
"""

from collections.abc import Sequence
from string import ascii_uppercase
from typing import Literal

import torch
from torch import Tensor, nn

from osftkit.data.math_sets import DataLoadError, read_table
from osftkit.models.logprobs import next_token_logprobs

COLUMNS = {"arc": ("question", "choices", "answerKey"), "mmlu": ("question", "choices", "answer")}


def _arc_row(i: int, row: dict) -> dict:
    choices = row["choices"]
    if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
        raise DataLoadError(
            f"Row {i}: ARC 'choices' must have 'text' and 'label', got {choices!r}."
        )
    options, labels = [str(t) for t in choices["text"]], [str(s) for s in choices["label"]]
    if len(options) != len(labels) or not options:
        raise DataLoadError(f"Row {i}: {len(options)} choice texts but {len(labels)} labels.")
    answer = str(row["answerKey"]).strip()
    if answer not in labels:
        raise DataLoadError(f"Row {i}: answerKey {answer!r} is not among the labels {labels}.")
    return {
        "question": str(row["question"]),
        "options": options,
        "labels": labels,
        "answer": answer,
    }


def _mmlu_row(i: int, row: dict) -> dict:
    options = row["choices"]
    if isinstance(options, str) or not isinstance(options, Sequence) or not options:
        raise DataLoadError(f"Row {i}: MMLU 'choices' must be a non-empty list, got {options!r}.")
    if len(options) > len(ascii_uppercase):
        raise DataLoadError(f"Row {i}: {len(options)} choices, more than there are letters.")
    labels = list(ascii_uppercase[: len(options)])
    answer = row["answer"]
    if isinstance(answer, str) and answer.strip() in labels:  # some copies store the letter
        answer = labels.index(answer.strip())
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(labels):
        raise DataLoadError(
            f"Row {i}: answer {answer!r} is not an index into its {len(labels)} choices."
        )
    return {
        "question": str(row["question"]),
        "options": [str(o) for o in options],
        "labels": labels,
        "answer": labels[answer],
    }


def load_multiple_choice(
    path: str,
    split: str = "test",
    format: Literal["arc", "mmlu"] = "arc",
    limit: int | None = None,
    subset: str | None = None,
) -> list[dict]:
    """Read ARC- or MMLU-format rows (local parquet/jsonl/json/csv or hub id) and normalise them.

    Returns rows {question, options: list[str], labels: list[str], answer: label}.
    ARC: question, choices {"text": [...], "label": [...]}, answerKey.
    MMLU: question, choices [...], answer (an index; labels are A, B, ...).
    """
    if format not in COLUMNS:
        raise ValueError(f"format must be one of {sorted(COLUMNS)}, got {format!r}")
    table = read_table(path, split=split, subset=subset)
    missing = [c for c in COLUMNS[format] if c not in table.column_names]
    if missing:
        raise DataLoadError(
            f"{format.upper()} data '{path}' lacks column(s) {missing}; "
            f"the table has {table.column_names}."
        )
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    if len(table) == 0:
        raise DataLoadError(f"{format.upper()} data '{path}' (split '{split}') has no rows.")
    normalise = _arc_row if format == "arc" else _mmlu_row
    return [normalise(i, row) for i, row in enumerate(table)]


def format_question(row: dict) -> str:
    """The reference's zero-shot prompt (its MMLU/ARC evaluation), for any number of choices."""
    choices = ", ".join(
        f"{label}:{option}" for label, option in zip(row["labels"], row["options"], strict=True)
    )
    return (
        "Read the question and select the answer from the choices. "
        f"Question: {row['question'].strip()} Choices: {choices}. Your answer is:"
    )


def label_token_ids(tokenizer, labels: Sequence[str]) -> tuple[list[int], dict[str, int]]:
    """The shared prefix ids and each label's token id, from tokenising " <label>".

    Usually " A" is one token and the prefix is empty. A byte-level tokenizer that splits it into
    [" ", "A"] gives the prefix [" "], which is appended to every prompt, and the id of "A".
    Anything else (a label of several tokens, differing prefixes) is an error.
    """
    prefix: list[int] | None = None
    ids: dict[str, int] = {}
    for label in sorted(set(labels)):
        tokens = tokenizer.encode(f" {label}", add_special_tokens=False)
        if not tokens:
            raise ValueError(f"Label {label!r} tokenises to nothing.")
        if prefix is None:
            prefix = tokens[:-1]
        if tokens[:-1] != prefix:
            raise ValueError(
                f"Label {label!r} is not a single token after a shared prefix: ' {label}' "
                f"tokenises to {tokens}, other labels to {prefix} + [one token]."
            )
        ids[label] = tokens[-1]
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"Labels share a token id: {ids}")
    return prefix or [], ids


@torch.no_grad()
def last_token_logprobs(model: nn.Module, sequences: list[list[int]], pad_id: int) -> Tensor:
    """Next-token log-probs after each sequence, batched with left padding."""
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    return next_token_logprobs(model, input_ids, mask)


def multiple_choice_predictions(
    model: nn.Module, tokenizer, rows: Sequence[dict], batch_size: int = 16
) -> list[str]:
    """The predicted label of each row: argmax of the next-token logits over its label tokens."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prefix, ids = label_token_ids(tokenizer, [label for row in rows for label in row["labels"]])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    predictions: list[str] = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            sequences = [tokenizer(format_question(row))["input_ids"] + prefix for row in batch]
            logits = last_token_logprobs(model, sequences, pad_id)
            for row, row_logits in zip(batch, logits, strict=True):
                candidates = torch.tensor([ids[label] for label in row["labels"]])
                best = row_logits[candidates.to(row_logits.device)].argmax().item()
                predictions.append(row["labels"][best])
    finally:
        model.train(was_training)
    return predictions


def multiple_choice_accuracy(
    model: nn.Module, tokenizer, rows: Sequence[dict], batch_size: int = 16
) -> float:
    """Zero-shot accuracy: the fraction of rows whose argmax label is the answer."""
    if not rows:
        raise ValueError("multiple_choice_accuracy needs at least one row")
    predictions = multiple_choice_predictions(model, tokenizer, rows, batch_size=batch_size)
    return sum(p == row["answer"] for p, row in zip(predictions, rows, strict=True)) / len(rows)
