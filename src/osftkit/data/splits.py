"""Dev splits disjoint from a test set: SePT picks the base model's tau_eval on a dev split, so
the test problems never choose the setting they are scored at."""

from collections.abc import Callable, Sequence

from datasets import Dataset

DatasetFactory = Callable[[], Dataset]


def disjoint_rows(
    source: DatasetFactory,
    exclude: Sequence[DatasetFactory],
    size: int,
    key: str = "problem",
) -> Dataset:
    """The first `size` rows of `source()` whose `key` occurs in none of the `exclude` tables
    (the test set; the training set too where it leaves enough rows)."""
    excluded = {value for make in exclude for value in make()[key]}
    table = source()
    kept = [i for i, value in enumerate(table[key]) if value not in excluded][:size]
    if len(kept) < size:
        raise ValueError(
            f"dev split: only {len(kept)} of the source's {len(table)} rows are outside the "
            f"excluded sets, {size} asked: enlarge the source or ask for fewer rows"
        )
    return table.select(kept)
