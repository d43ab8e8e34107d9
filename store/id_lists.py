"""Long id lists: one way for every statement that matches rows against a caller's ids.

A caller may pass any number of ids (documents to delete, metadata to update, spans whose slots
or text to read), but a database binds only so many parameters in one statement: 65,535 on
Postgres, 32,766 to 250,000 on SQLite depending on its build. So an ``IN (...)`` list is never
built from a caller's list directly: ``chunks`` cuts it into pieces of ``IN_CHUNK`` distinct
ids, and ``rows_matching`` runs one statement per piece inside the caller's transaction (one
snapshot, so the pieces add up to what a single statement would have answered).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import Executable
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

__all__ = ["IN_CHUNK", "chunks", "distinct", "id_array", "rows_matching"]

IN_CHUNK = 900  # ids per IN (...) list: below every SQLite build's parameter limit
_T = TypeVar("_T")


def distinct(items: Iterable[_T]) -> list[_T]:
    """The items without repeats, in first-seen order."""
    return list(dict.fromkeys(items))


def chunks(items: Sequence[_T], size: int = IN_CHUNK) -> Iterator[Sequence[_T]]:
    """``items`` in consecutive pieces of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def rows_matching(
    session: Session | Connection,
    statement: Callable[[Sequence[_T]], Executable],
    ids: Iterable[_T],
) -> Iterator[Any]:
    """The rows of ``statement(piece)`` for each piece of the distinct ``ids``, in order."""
    for piece in chunks(distinct(ids)):
        yield from session.execute(statement(piece))


def id_array(value: Any) -> np.ndarray:
    """Ids aggregated into one value (``Database.id_aggregate``: a Postgres array, a SQLite JSON
    text; NULL over no rows) as an int64 array."""
    if value is None:
        return np.empty(0, np.int64)
    if isinstance(value, str):
        value = json.loads(value)
    return np.asarray(value, dtype=np.int64)
