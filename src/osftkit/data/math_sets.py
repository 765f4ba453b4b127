"""Real math sets (or any prompt/answer table) from a hub id or a local parquet/jsonl/csv file."""

import logging
from collections import Counter
from pathlib import Path

from datasets import Dataset, Value, load_dataset

from osftkit.rewards.extract import extract_gsm8k

LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
REQUIRED = ("problem", "answer")
# verl's RL data format (the Online SFT reference recipe ships its benchmarks so):
# prompt = chat messages, reward_model = {ground_truth, style}, data_source = the set's name.
VERL_COLUMNS = ("prompt", "reward_model")
log = logging.getLogger(__name__)


class DataLoadError(RuntimeError):
    """A data source that cannot be read or does not have the expected columns and rows."""


def read_table(path: str, split: str = "train", subset: str | None = None) -> Dataset:
    """Read a split from a local file/directory or a hub id, with one clear error when offline."""
    local = Path(path).expanduser()
    if local.suffix in LOCAL_FORMATS:
        if not local.exists():
            raise DataLoadError(f"Data file '{path}' does not exist.")
        if local.stat().st_size == 0:
            raise DataLoadError(f"Data file '{path}' is empty.")
        return load_dataset(LOCAL_FORMATS[local.suffix], data_files=str(local), split="train")
    try:
        return load_dataset(str(local) if local.exists() else path, subset, split=split)
    except (OSError, ConnectionError, ValueError) as error:
        raise DataLoadError(
            f"Could not load dataset '{path}' (split '{split}'): {type(error).__name__}: {error}. "
            f"Offline? Download it on a machine with network access and point data to the local "
            f"file (parquet/jsonl), e.g. data.train.path=/data/train.parquet."
        ) from error


def to_prompt_table(
    table: Dataset, columns: dict[str, str], answer_format: str = "plain"
) -> Dataset:
    """Rename the source's columns to problem/solution/answer and check every row."""
    missing = [src for src in columns.values() if src not in table.column_names]
    if missing:
        raise DataLoadError(
            f"Column(s) {missing} not found; the table has {table.column_names}. "
            f"Set the data config's `columns` mapping."
        )
    renamed = table.select_columns(list(columns.values())).rename_columns(
        {src: dst for dst, src in columns.items() if src != dst}
    )
    if answer_format == "gsm8k":
        # GSM8K's answer column is a worked solution ending in "#### n": keep both parts.
        renamed = renamed.map(
            lambda row: {"solution": row["answer"], "answer": extract_gsm8k(row["answer"]) or ""}
        )
    if len(renamed) == 0:
        raise DataLoadError("The data split is empty.")
    for i, row in enumerate(renamed):
        for key in REQUIRED:
            if row.get(key) is None or str(row[key]).strip() == "":
                raise DataLoadError(f"Row {i}: required column '{key}' is empty ({dict(row)}).")
    return renamed.cast_column("answer", Value("string"))


def is_verl(table: Dataset, columns: dict[str, str]) -> bool:
    """A verl-format table, where the configured columns are absent but verl's are present."""
    names = table.column_names
    return all(c in names for c in VERL_COLUMNS) and not all(c in names for c in columns.values())


def from_verl(table: Dataset) -> Dataset:
    """verl rows -> problem (the last user message), answer (reward_model.ground_truth) and
    data_source; other columns are dropped."""

    def convert(row: dict) -> dict:
        users = [m["content"] for m in row["prompt"] or [] if m.get("role") == "user"]
        truth = (row["reward_model"] or {}).get("ground_truth")
        answer = truth[0] if isinstance(truth, list) and len(truth) == 1 else truth
        return {"problem": users[-1] if users else None, "answer": answer}

    keep = ["data_source"] if "data_source" in table.column_names else []
    drop = [c for c in table.column_names if c not in keep]
    converted = table.map(convert, remove_columns=drop)
    if keep:
        log.info("verl-format table: data_source %s", dict(Counter(converted["data_source"])))
    return converted


def load_prompt_table(
    path: str,
    columns: dict[str, str],
    split: str = "train",
    subset: str | None = None,
    answer_format: str = "plain",
    limit: int | None = None,
) -> Dataset:
    """Load a split and map it onto the kit's columns (problem, answer, optional solution); a
    verl-format table (prompt, reward_model, data_source) is read as such."""
    table, columns = read_table(path, split, subset), dict(columns)
    if is_verl(table, columns):
        table = from_verl(table)
        columns = {"problem": "problem", "answer": "answer"}
        if "data_source" in table.column_names:
            columns["data_source"] = "data_source"
    table = to_prompt_table(table, columns, answer_format)
    return table.select(range(min(limit, len(table)))) if limit else table
