"""Errors raised by the memory store; each names what went wrong and how to fix it."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from icmem.errors import IcmemError

__all__ = [
    "DamagedStoreError",
    "DimensionMismatchError",
    "DuplicateDocumentError",
    "ForeignSlotsError",
    "IndexFileError",
    "InvalidFilterError",
    "InvalidRecordError",
    "NotAStoreError",
    "ReadOnlyStoreError",
    "SchemaVersionError",
    "StoreDamageWarning",
    "StoreError",
    "StoreFullError",
    "StoreReadError",
    "StoreWriteError",
    "UnknownSpanError",
    "warn_damaged",
]


class StoreError(IcmemError):
    """Base class of every error the memory store raises on purpose."""


class NotAStoreError(StoreError):
    """The path or database exists but does not hold an icmem memory store."""


class SchemaVersionError(StoreError):
    """The store was written with a schema this version of icmem cannot read or migrate."""


class DimensionMismatchError(StoreError):
    """An embedding's length differs from the store's embedding dimension."""


class InvalidRecordError(StoreError, ValueError):
    """A document, span, vector or id given to the store is malformed (NaN, empty, wrong type)."""


class ForeignSlotsError(StoreError):
    """Memory slots were produced by a different base model than the one the store serves."""


class InvalidFilterError(StoreError, ValueError):
    """A metadata filter uses an unknown operator, a bad key or an unsupported value type."""


class ReadOnlyStoreError(StoreError):
    """A write was attempted on a store opened read-only or kept in a read-only location."""


class StoreWriteError(StoreError):
    """The database or index could not be written; nothing from the failed call was kept."""


class StoreFullError(StoreWriteError):
    """The disk (or the database's size limit) is full; nothing from the failed call was kept."""


class IndexFileError(StoreError):
    """A FAISS index file is missing, stale or corrupt; the store rebuilds it from the rows."""


class StoreReadError(StoreError):
    """The database refused a read for a reason other than damage (see the message)."""


class DamagedStoreError(StoreError):
    """The database file is damaged (unreadable pages); recover it or restore a backup."""


class DuplicateDocumentError(StoreError):
    """``add`` was given a document id that already exists in the namespace."""


class UnknownSpanError(StoreError, KeyError):
    """Span ids were asked for that do not exist (deleted, or outside the given namespace)."""

    def __str__(self) -> str:
        return str(self.args[0])


class StoreDamageWarning(UserWarning):
    """Some stored rows are damaged and were skipped so the rest of the store stays usable; list
    them with ``MemoryStore.check()`` or ``icmem store stats --check``."""


def warn_damaged(what: str, span_ids: Sequence[int], effect: str, stacklevel: int = 4) -> None:
    """Warn that some stored rows are damaged and what was done about them."""
    shown = sorted(span_ids)[:20]
    more = f" and {len(span_ids) - len(shown)} more" if len(span_ids) > len(shown) else ""
    warnings.warn(
        f"the stored {what} of span ids {shown}{more} are damaged and were {effect}; the rest of "
        "the store is unaffected. List every damaged row with `icmem store stats --check` (or "
        "MemoryStore.check()) and re-add the documents they belong to",
        StoreDamageWarning,
        stacklevel=stacklevel,
    )
