"""The memory store: SQL rows are the truth, FAISS is a rebuildable retrieval view.

Nothing here imports torch or model code: it stores arrays, bytes and rows. Start with
``MemoryStore.open(directory_or_url, dim=...)``; the records it takes and returns are in
``icmem.store.records`` and every deliberate error derives from ``StoreError``.
"""

from .errors import (
    DamagedStoreError,
    DimensionMismatchError,
    DuplicateDocumentError,
    ForeignSlotsError,
    IndexFileError,
    InvalidFilterError,
    InvalidRecordError,
    NotAStoreError,
    ReadOnlyStoreError,
    SchemaVersionError,
    StoreDamageWarning,
    StoreError,
    StoreFullError,
    StoreReadError,
    StoreWriteError,
    UnknownSpanError,
)
from .index import IndexPolicy
from .memory_store import MemoryStore
from .namespaces import MAX_NAMESPACE_DEPTH
from .records import (
    AddedDocument,
    DocumentInfo,
    DocumentRecord,
    Namespace,
    SearchHit,
    SpanRecord,
    SpanSlots,
    StoreCheck,
    StoreStats,
    content_id_of,
)

__all__ = [
    "MAX_NAMESPACE_DEPTH",
    "AddedDocument",
    "DamagedStoreError",
    "DimensionMismatchError",
    "DocumentInfo",
    "DocumentRecord",
    "DuplicateDocumentError",
    "ForeignSlotsError",
    "IndexFileError",
    "IndexPolicy",
    "InvalidFilterError",
    "InvalidRecordError",
    "MemoryStore",
    "Namespace",
    "NotAStoreError",
    "ReadOnlyStoreError",
    "SchemaVersionError",
    "SearchHit",
    "SpanRecord",
    "SpanSlots",
    "StoreCheck",
    "StoreDamageWarning",
    "StoreError",
    "StoreFullError",
    "StoreReadError",
    "StoreStats",
    "StoreWriteError",
    "UnknownSpanError",
    "content_id_of",
]
