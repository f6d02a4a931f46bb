"""The suite's own lists in tests/conftest.py name tests that exist: a renamed test
would otherwise drop out of the numerics pass, or into ``make test`` from the large
tier, without a word."""

from __future__ import annotations

import ast
from functools import cache

import pytest

from tests.conftest import LARGE, NUMERICS, SLOWEST_FIRST
from tests.helpers import ROOT


@cache
def _node_ids(path: str) -> set[str]:
    """``path``, ``path::test`` and ``path::Class`` / ``path::Class::test`` of a test file."""
    tree = ast.parse((ROOT / path).read_text())
    ids = {path}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            ids.add(f"{path}::{node.name}")
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            ids.add(f"{path}::{node.name}")
            ids.update(
                f"{path}::{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef) and item.name.startswith("test_")
            )
    return ids


@pytest.mark.parametrize("listed", [*NUMERICS, *LARGE, *SLOWEST_FIRST])
def test_each_listed_test_exists(listed):
    path = listed.split("::")[0]
    assert (ROOT / path).is_file(), listed
    assert listed in _node_ids(path), listed
