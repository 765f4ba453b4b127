"""Splits disjoint from a test set: SePT picks the base model's tau_eval on a dev split, so the
test problems never choose the setting they are scored at; and a study trains on prompts that
are in neither its dev nor its test split."""

from collections.abc import Callable, Sequence

from datasets import Dataset

DatasetFactory = Callable[[], Dataset]


def kept_rows(table: Dataset, exclude: Sequence[DatasetFactory], key: str) -> list[int]:
    """Indices of the rows of `table` whose `key` occurs in none of the `exclude` tables."""
    excluded = {value for make in exclude for value in make()[key]}
    return [i for i, value in enumerate(table[key]) if value not in excluded]


def disjoint_rows(
    source: DatasetFactory,
    exclude: Sequence[DatasetFactory],
    size: int,
    key: str = "problem",
) -> Dataset:
    """The first `size` rows of `source()` whose `key` occurs in none of the `exclude` tables
    (the test set; the training set too where it leaves enough rows)."""
    table = source()
    kept = kept_rows(table, exclude, key)[:size]
    if len(kept) < size:
        raise ValueError(
            f"dev split: only {len(kept)} of the source's {len(table)} rows are outside the "
            f"excluded sets, {size} asked: enlarge the source or ask for fewer rows"
        )
    return table.select(kept)


def without_problems(
    table: Dataset, exclude: Sequence[DatasetFactory], key: str = "problem"
) -> Dataset:
    """`table` less every row whose `key` occurs in an `exclude` table: a training set's
    `train_transform` that keeps the dev and test problems out of training."""
    kept = kept_rows(table, exclude, key)
    if not kept:
        raise ValueError("train_transform: every training row is in an excluded set")
    return table.select(kept)
