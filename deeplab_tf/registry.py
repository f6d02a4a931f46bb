"""Explicit name -> entry tables (variants, recipes): no decorators, no import side effects."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, TypeVar


class _Named(Protocol):
    name: str


T = TypeVar("T", bound=_Named)

# Fields that state a row's own results: a derived row does not inherit them.
_OWN_FIELDS = ("reference_miou",)


def make_registry(kind: str, *entries: T) -> dict[str, T]:
    """A dict of ``entries`` by name; a name declared twice is a ValueError."""
    table: dict[str, T] = {}
    for entry in entries:
        if entry.name in table:
            raise ValueError(f"{kind} {entry.name!r} is declared twice")
        table[entry.name] = entry
    return table


def lookup(table: dict[str, T], kind: str, name: str) -> T:
    """``table[name]``; an unknown name is a ValueError that lists the known ones."""
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(table)}")
    return table[name]


def changed(base: T, name: str, paper: str, **changes: Any) -> T:
    """A table row written as what it changes of ``base`` (a dataclass row), with its own
    name and source. The base's reference results (``reference_miou``) are not carried
    over: a derived row states its own or none."""
    own = {f.name: f.default for f in dataclasses.fields(base) if f.name in _OWN_FIELDS}
    return dataclasses.replace(base, name=name, paper=paper, **{**own, **changes})
