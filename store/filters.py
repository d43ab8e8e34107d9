"""Metadata filters: a small JSON query language compiled to bound SQL expressions.

A filter is a mapping over a document's top-level metadata keys::

    {"lang": "en"}                               equality (str, int, float, bool)
    {"year": {"$gte": 2020, "$lt": 2024}}        $eq $ne $gt $gte $lt $lte $in $nin $exists
    {"$or": [{"lang": "en"}, {"lang": "de"}]}    $and / $or over sub-filters

Every key and value reaches the database as a bound parameter, never as SQL text. Comparisons are
type-strict the way JSON is: ``{"n": 1}`` does not match ``"1"`` and ``{"flag": True}`` does not
match ``1``. Range operators compare numbers only, and exactly: 64-bit integers against each other
and against floats, on both backends (Postgres compares its JSON numbers as ``numeric``, not as
``float8``, which would round past 2**53). ``$ne``/``$nin`` also match documents that lack the key.

A filter compiles to a tree (``FilterNode``) rather than one expression, so that it may hold any
number of sub-filters: each AND / OR is written as a balanced tree of parenthesised halves (SQLite
refuses expressions nested ~1000 deep, which a flat ``a OR b OR ...`` of 1000 terms is), and a
node too large for one statement (bound parameters are limited: 32,766 on SQLite, 65,535 on
Postgres) is answered by several statements whose document ids are intersected or united
(``matching_ids``). The caller runs them in one read transaction, so they share one snapshot.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
from sqlalchemy import (
    ColumnElement,
    Float,
    Numeric,
    String,
    and_,
    case,
    cast,
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
from sqlalchemy.sql.elements import Grouping

from .errors import InvalidFilterError, InvalidRecordError
from .metadata_values import path_hash, value_hash
from .schema import DocumentRow, MetadataValueRow
from .validation import INT64_MAX, INT64_MIN, check_text

__all__ = ["FilterNode", "compile_filter", "matching_ids"]

_RANGE = {"$gt", "$gte", "$lt", "$lte"}
_COMPARE = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}
# Conditions per statement: a condition binds up to ~10 parameters, and a balanced tree of 256
# is 8 levels deep, well inside both databases' limits.
QUERY_WEIGHT = 256
_OPERATORS = {"$eq", "$ne", "$in", "$nin", "$exists", *_RANGE}
MAX_FILTER_DEPTH = 32  # nested $and/$or levels; deeper filters exhaust SQL parsers' stacks
_LOOKUP_VALUES = 64  # an $in of more values is tested on the JSON alone, without an index lookup


@dataclass(frozen=True)
class FilterNode:
    """A compiled filter: one SQL condition over ``DocumentRow`` (``op="leaf"``), or the AND /
    OR of compiled sub-filters. ``weight`` counts the conditions below, to size statements."""

    op: str
    clause: ColumnElement[bool] | None = None
    children: tuple[FilterNode, ...] = ()
    weight: int = 1

    def where(self) -> ColumnElement[bool]:
        """The whole node as one WHERE clause, each AND / OR written as a balanced tree."""
        if self.op == "leaf":
            assert self.clause is not None, "a leaf holds its condition"
            return self.clause
        return _balanced(self.op, [child.where() for child in self.children])


def compile_filter(
    filter_: Mapping[str, Any] | None, dialect: str, root: Sequence[str] = ()
) -> FilterNode:
    """Compile a metadata filter to a ``FilterNode`` over ``DocumentRow`` for the dialect.

    ``root`` names nested keys the filter's keys are relative to: with ``("item", "value")``
    the key ``"color"`` is ``metadata["item"]["value"]["color"]`` (a document lacking the root
    lacks every key). Top-level keys (no root) are what callers filter on; a root is how an
    integration that nests its own fields (the LangGraph store) filters in SQL."""
    if filter_ is None:
        return FilterNode("leaf", true())
    if not isinstance(filter_, Mapping):
        raise InvalidFilterError(
            f"a metadata filter must be a mapping, got {type(filter_).__name__}"
        )
    for part in root:
        _check_key(part)
    root = tuple(root)
    json = _PostgresJson(root) if dialect == "postgresql" else _SqliteJson(root)
    return _compile(filter_, json, 0)


def matching_ids(node: FilterNode, run: Callable[[ColumnElement[bool]], np.ndarray]) -> np.ndarray:
    """The sorted ids ``run`` finds for ``node``: ``run(where)`` answers one WHERE clause with
    sorted, distinct ids. A node heavier than one statement is split into groups of its
    children, each answered on its own, and their ids intersected (AND) or united (OR)."""
    if node.op == "leaf" or node.weight <= QUERY_WEIGHT:
        return run(node.where())
    combine = np.intersect1d if node.op == "and" else np.union1d
    result: np.ndarray | None = None
    for group in _groups(node.children):
        if len(group) == 1:
            ids = matching_ids(group[0], run)
        else:
            ids = run(_balanced(node.op, [child.where() for child in group]))
        result = ids if result is None else combine(result, ids)
        if node.op == "and" and not len(result):
            break
    assert result is not None, "$and / $or take a non-empty list"
    return result


def _groups(children: Sequence[FilterNode]) -> list[list[FilterNode]]:
    """Children packed into groups of at most ``QUERY_WEIGHT`` conditions; a heavier child is a
    group of its own (split again by ``matching_ids``)."""
    groups: list[list[FilterNode]] = []
    current: list[FilterNode] = []
    weight = 0
    for child in children:
        if child.weight > QUERY_WEIGHT:
            groups.append([child])
            continue
        if weight + child.weight > QUERY_WEIGHT:
            groups.append(current)
            current, weight = [], 0
        current.append(child)
        weight += child.weight
    if current:
        groups.append(current)
    return groups


def _balanced(op: str, clauses: Sequence[ColumnElement[bool]]) -> ColumnElement[bool]:
    """``a AND b AND ...`` as parenthesised halves: depth log2(n) instead of n, because SQLite
    parses a flat chain as a tree n levels deep and refuses it past ~1000 ("expression tree is
    too large"). SQLAlchemy flattens nested AND / OR, so each half is grouped explicitly."""
    if len(clauses) == 1:
        return clauses[0]
    middle = len(clauses) // 2
    left = _balanced(op, clauses[:middle])
    right = _balanced(op, clauses[middle:])
    join = and_ if op == "and" else or_
    return join(Grouping(left), Grouping(right))


def _node(op: str, children: list[FilterNode]) -> FilterNode:
    if len(children) == 1:
        return children[0]
    if not children:
        return FilterNode("leaf", true())
    return FilterNode(op, children=tuple(children), weight=sum(c.weight for c in children))


def _compile(filter_: Mapping[str, Any], json: _SqliteJson, depth: int) -> FilterNode:
    if depth > MAX_FILTER_DEPTH:
        raise InvalidFilterError(
            f"the filter is nested more than {MAX_FILTER_DEPTH} $and/$or levels deep; flatten it "
            "(a single $and/$or takes any number of sub-filters)"
        )
    nodes = []
    for key, condition in filter_.items():
        if key in ("$and", "$or"):
            if not isinstance(condition, list | tuple) or not condition:
                raise InvalidFilterError(f"{key} takes a non-empty list of filters")
            parts = [_compile(_as_mapping(sub), json, depth + 1) for sub in condition]
            nodes.append(_node(key[1:], parts))
        elif isinstance(key, str) and key.startswith("$"):
            raise InvalidFilterError(f"unknown filter operator {key!r} at the top level")
        else:
            _check_key(key)
            clause, weight = _compile_key(key, condition, json)
            nodes.append(FilterNode("leaf", clause, weight=weight))
    return _node("and", nodes)


def _compile_key(key: str, condition: Any, json: _SqliteJson) -> tuple[ColumnElement[bool], int]:
    """The exact condition on one key, behind an index lookup of the documents that may meet
    it (``store.metadata_values``) where the condition has one: equality, a short ``$in``, a
    range. ``$ne``, ``$nin`` and ``$exists`` (which match documents lacking the key) have none."""
    if not isinstance(condition, Mapping):
        value = _scalar(key, condition)
        return and_(json.indexed_equal(key, [value]), json.equals(key, value)), 1
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
            clauses.append(func.coalesce(json.compare(key, op, _number(key, value)), false()))
    return and_(*_lookup(key, condition, json), *clauses), len(clauses)


def _lookup(key: str, condition: Mapping[str, Any], json: _SqliteJson) -> list[Any]:
    """The index lookup narrowing a checked operator mapping on one key, if it has one."""
    if "$eq" in condition:
        return [json.indexed_equal(key, [condition["$eq"]])]
    if "$in" in condition and len(condition["$in"]) <= _LOOKUP_VALUES:
        return [json.indexed_equal(key, list(condition["$in"]))]
    bounds = {op: float(v) for op, v in condition.items() if op in _RANGE}
    if not bounds:
        return []
    low = max((v for op, v in bounds.items() if op in ("$gt", "$gte")), default=None)
    high = min((v for op, v in bounds.items() if op in ("$lt", "$lte")), default=None)
    return [json.indexed_range(key, low, high)]


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

    def __init__(self, root: tuple[str, ...] = ()) -> None:
        # Stores written before metadata was validated may hold NaN, which SQLite's JSON functions
        # reject with an error that would fail the whole search: such metadata reads as empty.
        column = DocumentRow.metadata_
        self.column: Any = case((func.json_valid(column) == 1, column))
        self.root = root

    def _path(self, key: str) -> Any:
        return literal("$" + "".join(f'."{part}"' for part in (*self.root, key)))

    def _type(self, key: str) -> Any:
        # One expression per key, shared by every condition on it: a filter of thousands of
        # branches on a few keys builds (and binds) far fewer objects.
        cache = self.__dict__.setdefault("_types", {})
        if key not in cache:
            cache[key] = func.json_type(self.column, self._path(key))
        return cache[key]

    def _extract(self, key: str) -> Any:
        cache = self.__dict__.setdefault("_extracts", {})
        if key not in cache:
            cache[key] = func.json_extract(self.column, self._path(key))
        return cache[key]

    def missing(self, key: str) -> ColumnElement[bool]:
        return self._type(key).is_(None)

    def indexed_equal(self, key: str, values: list[Any]) -> ColumnElement[bool]:
        """Documents with one of ``values`` at ``key`` by the metadata value rows (a superset:
        the exact condition still runs on what this finds)."""
        hashes = sorted({value_hash(v) for v in values})
        value = MetadataValueRow.value
        match = value == hashes[0] if len(hashes) == 1 else value.in_(hashes)
        return self._documents_where(key, match)

    def indexed_range(self, key: str, low: float | None, high: float | None) -> ColumnElement[bool]:
        """Documents with a number at ``key`` between the (widened, double) bounds."""
        number = MetadataValueRow.number
        conditions: list[ColumnElement[bool]] = [number.is_not(None)]
        if low is not None:
            conditions.append(number >= low)
        if high is not None:
            conditions.append(number <= high)
        return self._documents_where(key, *conditions)

    def _documents_where(self, key: str, *conditions: Any) -> ColumnElement[bool]:
        found = select(MetadataValueRow.document_id).where(
            MetadataValueRow.path == path_hash((*self.root, key)), *conditions
        )
        return DocumentRow.id.in_(found)

    def equals(self, key: str, value: str | int | float | bool) -> ColumnElement[bool]:
        if isinstance(value, bool):
            return func.coalesce(self._type(key) == ("true" if value else "false"), false())
        kinds = ("text",) if isinstance(value, str) else ("integer", "real")
        cache = self.__dict__.setdefault("_kind_tests", {})
        if (key, kinds) not in cache:
            cache[key, kinds] = self._type(key).in_(kinds)
        return func.coalesce(and_(cache[key, kinds], self._extract(key) == value), false())

    def compare(self, key: str, op: str, value: int | float) -> ColumnElement[bool]:
        """A range comparison; NULL where the value is not a number. SQLite compares integers,
        reals and the two mixed exactly."""
        number = case(
            (
                self._type(key).in_(("integer", "real")),
                self._extract(key),
            )
        )
        return _COMPARE[op](number, value)

    def in_(self, key: str, values: list[str | int | float | bool]) -> ColumnElement[bool]:
        """Equality with any of ``values``, type-strict, as one bound JSON array per type: an
        OR of equalities fails past ~990 values ("expression tree is too large") and bound
        IN lists past SQLite's variable limit."""
        kinds = _by_kind(values)
        extracted = self._extract(key)
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

    def __init__(self, root: tuple[str, ...] = ()) -> None:
        self.column = type_coerce(DocumentRow.metadata_, JSONB())
        self.root = root

    def _element(self, key: str) -> Any:
        """``metadata -> key``, or ``metadata #> '{root..., key}'`` under a root."""
        if not self.root:
            return self.column[key]
        path = (*self.root, key)
        return self.column[path]

    def missing(self, key: str) -> ColumnElement[bool]:
        if not self.root:
            return not_(self.column.has_key(key))
        return self._element(key).is_(None)  # #> is SQL NULL only where the path is absent

    def equals(self, key: str, value: str | int | float | bool) -> ColumnElement[bool]:
        nested: Any = {key: value}
        for part in reversed(self.root):
            nested = {part: nested}
        return self.column.contains(nested)

    def compare(self, key: str, op: str, value: int | float) -> ColumnElement[bool]:
        """A range comparison, exact like SQLite's. jsonb keeps numbers as ``numeric``: an
        integral one (every stored int, and a float whose decimal form is integral) is compared
        with the exact value of the bound, so 2**53 + 1 stays above 2**53; a fractional one was
        a Python float, written as its shortest decimal form, and is compared as that float
        (``float8`` reads the form back to the same double), as is any number past the int64
        range. Floats from 2**53 to 2**63 look integral and are compared by their decimal
        form, which may differ from the double in the digits that the form leaves out."""
        element = self._element(key)
        number = case((func.jsonb_typeof(element) == "number", cast(element, Numeric())))
        exact = literal(Decimal(value), Numeric())  # Decimal(float) is the double's exact value
        compare = _COMPARE[op]
        # An integral number within int64 may be a stored int: exact. Beyond, it was a float.
        integral = and_(number == func.trunc(number), func.abs(number) < literal(2**63, Numeric()))
        return case(
            (integral, compare(number, exact)),
            else_=compare(cast(number, Float()), literal(float(value), Float())),
        )

    def in_(self, key: str, values: list[str | int | float | bool]) -> ColumnElement[bool]:
        # jsonb equality is type-strict and numeric (1 = 1.0, 1 <> "1", 1 <> true) like SQLite's.
        array = literal(list(values), JSONB())
        elements = select(func.jsonb_array_elements(array).column_valued()).scalar_subquery()
        return func.coalesce(self._element(key).in_(elements), false())


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
