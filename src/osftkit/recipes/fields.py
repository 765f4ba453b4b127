"""`knob`: a dataclass field with the one-line documentation that `python -m osftkit.recipes`
prints (Hydra's structured configs keep only the default; the doc rides in the metadata)."""

from collections.abc import Callable
from dataclasses import MISSING, Field, field
from typing import Any


def knob(default: Any = MISSING, doc: str = "", factory: Callable[[], Any] | None = None) -> Any:
    """A field with `doc`: the paper's symbol or setting it is."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def doc_of(item: Field) -> str:
    return item.metadata.get("doc", "")


def nested(cls: type, value: Any, knob: str) -> Any:
    """An optional nested block -> its dataclass (None stays None); one clear error if not.

    Such blocks are typed `Any` in the schema: Hydra cannot override a None-valued structured
    node from the command line (`method.anneal='{epochs: 2}'`), so they are checked here."""
    if value is None or isinstance(value, cls):
        return value
    try:
        return cls(**value)
    except TypeError as error:
        raise ValueError(f"method.{knob}: {error}") from None
