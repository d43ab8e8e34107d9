"""Metadata filters: a small JSON query language compiled to bound SQL expressions.

A filter is a mapping over a document's top-level metadata keys::

    {"lang": "en"}                               equality (str, int, float, bool)
    {"year": {"$gte": 2020, "$lt": 2024}}        $eq $ne $gt $gte $lt $lte $in $nin $exists
    {"$or": [{"lang": "en"}, {"lang": "de"}]}    $and / $or over sub-filters

Every key and value reaches the database as a bound parameter, never as SQL text. Comparisons are
type-strict the way JSON is: ``{"n": 1}`` does not match ``"1"`` and ``{"flag": True}`` does not
match ``1``. Range operators compare numbers only; ``$ne``/``$nin`` also match documents that lack
the key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    ColumnElement,
    String,
    and_,
    case,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import JSONB

from .errors import InvalidFilterError, InvalidRecordError
from .schema import DocumentRow
from .validation import INT64_MAX, INT64_MIN, check_text

__all__ = ["compile_filter"]

_RANGE = {"$gt", "$gte", "$lt", "$lte"}
_OPERATORS = {"$eq", "$ne", "$in", "$nin", "$exists", *_RANGE}
MAX_FILTER_DEPTH = 32  # nested $and/$or levels; deeper filters exhaust SQL parsers' stacks


def compile_filter(filter_: Mapping[str, Any] | None, dialect: str) -> ColumnElement[bool]:
    """Compile a metadata filter to a WHERE clause over ``DocumentRow`` for the given dialect."""
    if filter_ is None:
        return true()
    if not isinstance(filter_, Mapping):
        raise InvalidFilterError(
            f"a metadata filter must be a mapping, got {type(filter_).__name__}"
        )
    json = _PostgresJson() if dialect == "postgresql" else _SqliteJson()
    return _compile(filter_, json, 0)


def _compile(filter_: Mapping[str, Any], json: _SqliteJson, depth: int) -> ColumnElement[bool]:
    if depth > MAX_FILTER_DEPTH:
        raise InvalidFilterError(
            f"the filter is nested more than {MAX_FILTER_DEPTH} $and/$or levels deep; flatten it "
            "(a single $and/$or takes any number of sub-filters)"
        )
    clauses = []
    for key, condition in filter_.items():
        if key in ("$and", "$or"):
            if not isinstance(condition, list | tuple) or not condition:
                raise InvalidFilterError(f"{key} takes a non-empty list of filters")
            parts = [_compile(_as_mapping(sub), json, depth + 1) for sub in condition]
            clauses.append(and_(*parts) if key == "$and" else or_(*parts))
        elif isinstance(key, str) and key.startswith("$"):
            raise InvalidFilterError(f"unknown filter operator {key!r} at the top level")
        else:
            _check_key(key)
            clauses.append(_compile_key(key, condition, json))
    return and_(true(), *clauses)


def _compile_key(key: str, condition: Any, json: _SqliteJson) -> ColumnElement[bool]:
    if not isinstance(condition, Mapping):
        return json.equals(key, _scalar(key, condition))
    if not condition:
        raise InvalidFilterError(f"filter for {key!r} is an empty operator mapping")
    clauses = []
    for op, value in condition.items():
        if op not in _OPERATORS:
            raise InvalidFilterError(
                f"unknown operator {op!r} for key {key!r}; use one of "
                f"{', '.join(sorted(_OPERATORS))}"
            )
        if op == "$eq":
            clauses.append(json.equals(key, _scalar(key, value)))
        elif op == "$ne":
            clauses.append(or_(json.missing(key), not_(json.equals(key, _scalar(key, value)))))
        elif op in ("$in", "$nin"):
            if not isinstance(value, list | tuple) or not value:
                raise InvalidFilterError(f"{op} for {key!r} takes a non-empty list of values")
            matches = json.in_(key, [_scalar(key, v) for v in value])
            clauses.append(matches if op == "$in" else or_(json.missing(key), not_(matches)))
        elif op == "$exists":
            if not isinstance(value, bool):
                raise InvalidFilterError(f"$exists for {key!r} takes True or False")
            clauses.append(not_(json.missing(key)) if value else json.missing(key))
        else:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidFilterError(f"{op} for {key!r} compares numbers only, got {value!r}")
            value = _number(key, value)
            number = json.number(key)
            comparison = {
                "$gt": number > value,
                "$gte": number >= value,
                "$lt": number < value,
                "$lte": number <= value,
            }[op]
            clauses.append(func.coalesce(comparison, false()))
    return and_(*clauses)


def _as_mapping(sub: Any) -> Mapping[str, Any]:
    if not isinstance(sub, Mapping):
        raise InvalidFilterError(f"$and/$or items must be filters (mappings), got {sub!r}")
    return sub


def _check_key(key: Any) -> None:
    if not isinstance(key, str) or not key or '"' in key or "\\" in key:
        raise InvalidFilterError(
            f"metadata filter keys must be non-empty strings without quotes or backslashes, "
            f"got {key!r}"
        )
    _check_string(key, "metadata filter key")


def _check_string(value: str, what: str) -> str:
    try:
        return check_text(value, what)
    except InvalidRecordError as exc:
        raise InvalidFilterError(str(exc)) from None


def _number(key: str, value: int | float) -> int | float:
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise InvalidFilterError(
            f"filter value {value} for {key!r} is outside the 64-bit integer range that stored "
            "metadata can hold; no document can match it"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidFilterError(
            f"cannot filter {key!r} on {value} (NaN or infinity): stored metadata never holds it"
        )
    return value


def _scalar(key: str, value: Any) -> str | int | float | bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _check_string(value, f"filter value for {key!r}")
    if isinstance(value, int | float):
        return _number(key, value)
    raise InvalidFilterError(
        f"filter value for {key!r} must be a string, number or boolean, got {type(value).__name__}"
    )


class _SqliteJson:
    """JSON1 functions; the path is a bound parameter, the key was checked to need no escaping."""

    def __init__(self) -> None:
        # Stores written before metadata was validated may hold NaN, which SQLite's JSON functions
        # reject with an error that would fail the whole search: such metadata reads as empty.
        column = DocumentRow.metadata_
        self.column: Any = case((func.json_valid(column) == 1, column))

    def _path(self, key: str) -> Any:
        return literal(f'$."{key}"')

    def _type(self, key: str) -> Any:
        return func.json_type(self.column, self._path(key))

    def missing(self, key: str) -> ColumnElement[bool]:
        return self._type(key).is_(None)

    def equals(self, key: str, value: str | int | float | bool) -> ColumnElement[bool]:
        if isinstance(value, bool):
            return func.coalesce(self._type(key) == ("true" if value else "false"), false())
        kinds = ("text",) if isinstance(value, str) else ("integer", "real")
        extracted = func.json_extract(self.column, self._path(key))
        return func.coalesce(and_(self._type(key).in_(kinds), extracted == value), false())

    def number(self, key: str) -> Any:
        return case(
            (
                self._type(key).in_(("integer", "real")),
                func.json_extract(self.column, self._path(key)),
            )
        )

    def in_(self, key: str, values: list[str | int | float | bool]) -> ColumnElement[bool]:
        """Equality with any of ``values``, type-strict, as one bound JSON array per type: an
        OR of equalities fails past ~990 values ("expression tree is too large") and bound
        IN lists past SQLite's variable limit."""
        kinds = _by_kind(values)
        extracted = func.json_extract(self.column, self._path(key))
        clauses = []
        if kinds.booleans:
            names = ["true" if b else "false" for b in kinds.booleans]
            clauses.append(self._type(key).in_(names))
        if kinds.strings:
            clauses.append(
                and_(self._type(key) == "text", extracted.in_(_json_array(kinds.strings)))
            )
        if kinds.numbers:
            clauses.append(
                and_(
                    self._type(key).in_(("integer", "real")),
                    extracted.in_(_json_array(kinds.numbers)),
                )
            )
        return func.coalesce(or_(*clauses), false())


class _PostgresJson(_SqliteJson):
    """JSONB operators: containment for equality, a typeof guard before casting to a number."""

    def __init__(self) -> None:
        self.column = type_coerce(DocumentRow.metadata_, JSONB())

    def missing(self, key: str) -> ColumnElement[bool]:
        return not_(self.column.has_key(key))

    def equals(self, key: str, value: str | int | float | bool) -> ColumnElement[bool]:
        return self.column.contains({key: value})

    def number(self, key: str) -> Any:
        element = self.column[key]
        return case((func.jsonb_typeof(element) == "number", element.as_float()))

    def in_(self, key: str, values: list[str | int | float | bool]) -> ColumnElement[bool]:
        # jsonb equality is type-strict and numeric (1 = 1.0, 1 <> "1", 1 <> true) like SQLite's.
        array = literal(list(values), JSONB())
        elements = select(func.jsonb_array_elements(array).column_valued()).scalar_subquery()
        return func.coalesce(self.column[key].in_(elements), false())


@dataclass
class _Kinds:
    booleans: list[bool] = field(default_factory=list)
    strings: list[str] = field(default_factory=list)
    numbers: list[int | float] = field(default_factory=list)


def _by_kind(values: list[str | int | float | bool]) -> _Kinds:
    kinds = _Kinds()
    for value in values:
        if isinstance(value, bool):
            kinds.booleans.append(value)
        elif isinstance(value, str):
            kinds.strings.append(value)
        else:
            kinds.numbers.append(value)
    return kinds


def _json_array(values: list[Any]) -> Any:
    """``SELECT value FROM json_each(:array)``: any number of values in one bound parameter."""
    table = func.json_each(literal(json.dumps(values), String())).table_valued("value")
    return select(table.c.value).scalar_subquery()
