"""A LangGraph search filter narrowed to a store filter that runs in SQL.

LangGraph's filter (``filters.matches_filter``) has Python's meaning: ``1 == 1.0 == True``, a
range operator parses numeric strings, a dict or list compares element by element. The store's
filter language is JSON-typed and strict. So the store filter built here is a *superset*: every
item the LangGraph filter matches also matches it, and the exact Python check still runs on
what SQL returns. Conditions with no safe SQL counterpart (ranges, ``$ne``, ``$nin``, ``None``,
lists, nested dicts) are left to Python; what SQL can narrow (equality and ``$in`` on strings,
numbers and booleans) is narrowed there, so a selective filter reads only the items it keeps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["VALUE_ROOT", "store_prefilter"]

# Where an item's value lives in its document's metadata (see store.ITEM_KEY).
VALUE_ROOT = ("langgraph_item", "value")


def store_prefilter(filter_: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A store filter, relative to ``VALUE_ROOT``, that every item matching ``filter_`` meets;
    None when nothing can be narrowed in SQL."""
    if not filter_:
        return None
    clauses = []
    for key, condition in filter_.items():
        if not isinstance(key, str) or key.startswith("$"):
            continue
        clause = _clause(key, condition)
        if clause is not None:
            clauses.append(clause)
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _clause(key: str, condition: Any) -> dict[str, Any] | None:
    if isinstance(condition, Mapping):
        if not condition or not all(isinstance(k, str) and k.startswith("$") for k in condition):
            return None  # a nested dict compared key by key: left to Python
        narrowed = [
            c for name, operand in condition.items() if (c := _operator(key, name, operand))
        ]
        if not narrowed:
            return None
        return narrowed[0] if len(narrowed) == 1 else {"$and": narrowed}
    values = _equal_values(condition)
    return None if values is None else _any_of(key, values)


def _operator(key: str, name: str, operand: Any) -> dict[str, Any] | None:
    if name == "$eq":
        values = _equal_values(operand)
        return None if values is None else _any_of(key, values)
    if name == "$in" and isinstance(operand, list | tuple) and operand:
        every: list[Any] = []
        for option in operand:
            values = _equal_values(option)
            if values is None:
                return None  # one option SQL cannot test: the whole $in is left to Python
            every.extend(v for v in values if not any(_same(v, w) for w in every))
        return _any_of(key, every)
    return None


def _equal_values(value: Any) -> list[Any] | None:
    """The JSON values a Python ``==`` with ``value`` can hold true for, or None if unknown."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, bool):
        return [value, int(value)]  # True == 1 == 1.0 in Python; 1 also matches 1.0 in SQL
    if isinstance(value, int | float) and math.isfinite(value):
        return [value, bool(value)] if value in (0, 1) else [value]
    return None


def _any_of(key: str, values: list[Any]) -> dict[str, Any]:
    return {key: values[0]} if len(values) == 1 else {key: {"$in": values}}


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b
