"""Explicit name -> entry tables (variants, recipes): no decorators, no import side effects."""

from __future__ import annotations

from typing import Protocol, TypeVar


class _Named(Protocol):
    name: str


T = TypeVar("T", bound=_Named)


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
