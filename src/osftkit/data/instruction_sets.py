"""Real instruction sets, Alpaca and OpenOrca, from a hub id or a local json/jsonl/parquet file.

Both are read with the kit's table loader and mapped onto problem/solution/answer. The user
text follows the SANDE reference template: Alpaca joins instruction and input, OpenOrca puts the
system prompt before the question.
"""

from datasets import Dataset

from osftkit.data.math_sets import DataLoadError, read_table, to_prompt_table


def _joined(first: str | None, second: str | None) -> str:
    return " ".join(part.strip() for part in (first, second) if part and part.strip())


def _load(
    path: str, split: str, limit: int | None, parts: tuple[str, str], response: str
) -> Dataset:
    table = read_table(path, split)
    missing = [c for c in (*parts, response) if c not in table.column_names]
    if missing:
        raise DataLoadError(f"'{path}' lacks column(s) {missing}; it has {table.column_names}")
    if limit:
        table = table.select(range(min(limit, len(table))))
    table = table.map(
        lambda row: {
            "problem": _joined(row[parts[0]], row[parts[1]]),
            "solution": row[response],
            "answer": row[response],
        },
        remove_columns=table.column_names,
    )
    return to_prompt_table(table, {key: key for key in ("problem", "solution", "answer")})


def load_alpaca(path: str, split: str = "train", limit: int | None = None) -> Dataset:
    """Alpaca-style rows (instruction, input, output)."""
    return _load(path, split, limit, ("instruction", "input"), "output")


def load_openorca(path: str, split: str = "train", limit: int | None = None) -> Dataset:
    """OpenOrca-style rows (system_prompt, question, response)."""
    return _load(path, split, limit, ("system_prompt", "question"), "response")
