"""Reading a document's stored metadata without letting one damaged row take reads down.

Metadata is checked to be a JSON object before it is written (``store.validation``), but a row
can still hold something else: text that is not JSON (a SQLite file edited or partly restored),
or a JSON array, string or number (written by another tool). The SQLAlchemy JSON type would
parse it inside the row fetch and fail the whole call with a raw ``JSONDecodeError``, so reads
take the column as it is stored (``RAW_METADATA``) and parse it here: a row that does not hold
an object is left out of the answer with a ``StoreDamageWarning`` naming its document, and the
writes that repair it (``update_metadata``, ``upsert``) never parse the old value at all.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Text, case, func, true, type_coerce
from sqlalchemy.dialects.postgresql import JSONB

from .errors import StoreDamageWarning
from .schema import DocumentRow

__all__ = ["RAW_METADATA", "damaged_metadata", "parse_metadata", "warn_damaged_metadata"]

# The column with no result processing: text on SQLite; on Postgres the driver's own value.
RAW_METADATA = type_coerce(DocumentRow.metadata_, Text()).label("document_metadata")


def parse_metadata(value: Any) -> dict[str, Any] | None:
    """The metadata a row holds, or None when it is damaged (not a JSON object). JSON ``null``
    reads as no metadata, as it always has."""
    if isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if value is None:
        return {}
    return value if isinstance(value, dict) else None


def damaged_metadata(dialect: str) -> ColumnElement[bool]:
    """A WHERE clause true for the rows ``parse_metadata`` calls damaged (for ``check()``):
    not JSON at all (SQLite), or JSON that is neither an object nor null (both backends). On
    SQLite, legacy metadata holding NaN is listed too: Python reads it, SQL filters cannot."""
    kinds = ("object", "null")
    if dialect == "postgresql":
        jsonb = type_coerce(DocumentRow.metadata_, JSONB())
        return func.jsonb_typeof(jsonb).not_in(kinds)
    text = DocumentRow.metadata_
    return case((func.json_valid(text) == 0, true()), else_=func.json_type(text).not_in(kinds))


def warn_damaged_metadata(documents: Sequence[tuple[Sequence[str], str]], stacklevel: int) -> None:
    """Warn that some documents' metadata is damaged and was left out, and how to repair it."""
    shown = ", ".join(f"{key!r} in {list(ns)}" for ns, key in documents[:10])
    more = f" and {len(documents) - 10} more" if len(documents) > 10 else ""
    warnings.warn(
        f"the stored metadata of documents {shown}{more} is not a JSON object (damaged), so "
        "they were left out of the answer; the rest of the store is unaffected. Repair each one "
        "by writing its metadata again with update_metadata() or upsert(), or delete it; "
        "`icmem store stats --check` (MemoryStore.check()) lists them all",
        StoreDamageWarning,
        stacklevel=stacklevel,
    )
