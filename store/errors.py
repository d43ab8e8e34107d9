"""Errors raised by the memory store; each names what went wrong and how to fix it."""

from __future__ import annotations

from icmem.errors import IcmemError

__all__ = [
    "DamagedStoreError",
    "DimensionMismatchError",
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


class StoreDamageWarning(UserWarning):
    """Some stored rows are damaged and were skipped so the rest of the store stays usable; list
    them with ``MemoryStore.check()`` or ``icmem store stats --check``."""
