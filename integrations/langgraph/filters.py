"""LangGraph's search filter over an item's value, with the meaning LangGraph's stores give it.

A filter maps top-level value keys to conditions. A plain value must equal the item's (a list
element by element, a dict key by key, recursively); a dict whose keys start with `$` applies
operators: `$eq`, `$ne`, `$gt`, `$gte`, `$lt`, `$lte` (numbers) and `$in`, `$nin` (lists). A
range operator on a missing or non-numeric value does not match.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["matches_filter"]

_RANGES = {
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
}


def matches_filter(value: Mapping[str, Any], filter: Mapping[str, Any]) -> bool:
    """Whether an item's value meets every condition of a search filter."""
    return all(_meets(value.get(key), condition) for key, condition in filter.items())


def _meets(found: Any, condition: Any) -> bool:
    if isinstance(condition, Mapping):
        if any(isinstance(k, str) and k.startswith("$") for k in condition):
            return all(_operator(found, name, operand) for name, operand in condition.items())
        return isinstance(found, Mapping) and all(
            _meets(found.get(key), sub) for key, sub in condition.items()
        )
    if isinstance(condition, list | tuple):
        return (
            isinstance(found, list | tuple)
            and len(found) == len(condition)
            and all(_meets(f, c) for f, c in zip(found, condition, strict=True))
        )
    return found == condition


def _operator(found: Any, name: str, operand: Any) -> bool:
    if name == "$eq":
        return _meets(found, operand)
    if name == "$ne":
        return not _meets(found, operand)
    if name in _RANGES:
        number, bound = _number(found), _number(operand, name)
        return number is not None and _RANGES[name](number, bound)
    if name in ("$in", "$nin"):
        if not isinstance(operand, list | tuple):
            raise ValueError(f"filter operator {name} takes a list, got {operand!r}")
        inside = any(_meets(found, option) for option in operand)
        return inside if name == "$in" else not inside
    raise ValueError(
        f"unknown filter operator {name!r}; use $eq, $ne, $gt, $gte, $lt, $lte, $in or $nin"
    )


def _number(value: Any, operator: str | None = None) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        number = None
    else:
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or math.isnan(number):
        if operator is not None:
            raise ValueError(f"filter operator {operator} takes a number, got {value!r}")
        return None
    return number
