"""`python -m osftkit.recipes [method]`: a method's knobs, their types, defaults and docs."""

import dataclasses
import sys

from rich.console import Console
from rich.table import Table

from osftkit.recipes import SCHEMAS
from osftkit.recipes.fields import doc_of


def knob_table(name: str) -> Table:
    recipe = SCHEMAS[name]
    table = Table(title=f"method={name}: {recipe.__doc__.splitlines()[0]}")
    for column in ("knob", "type", "default", "what it is"):
        table.add_column(column)
    for item in dataclasses.fields(recipe):
        if item.default is not dataclasses.MISSING:
            default = repr(item.default)
        else:
            default = repr(item.default_factory())
        table.add_row(item.name, str(item.type).replace("typing.", ""), default, doc_of(item))
    return table


def main(argv: list[str]) -> int:
    names = argv or list(SCHEMAS)
    unknown = [n for n in names if n not in SCHEMAS]
    if unknown:
        print(f"unknown method '{unknown[0]}': one of {', '.join(SCHEMAS)}", file=sys.stderr)
        return 1
    for name in names:
        Console().print(knob_table(name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
