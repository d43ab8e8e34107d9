"""The store's SQL, grouped by domain; ``MemoryStore`` orchestrates these and writes none.

``namespaces`` finds and creates namespaces and moves their generation (the sequence number
that keeps the rows and the index in step), ``documents`` and ``spans`` read and write what
their names say, ``settings`` pins store-wide values, ``health`` counts rows and reads them
for ``check()``, and ``index_rows`` is what the index room (``store.shards``) reads and
writes. The functions run inside the caller's transaction (a read connection or a write
session from ``store.database``) and return plain rows, dicts and arrays. Lists of a caller's
ids are always cut by ``store.id_lists``.
"""

from __future__ import annotations

from .documents import (
    adopt_parts,
    delete_documents,
    document_ids,
    document_rows,
    document_rows_by_id,
    filtered_document_ids,
    index_metadata,
    insert_document,
    namespaces_holding,
    replace_document,
    set_metadata,
)
from .health import counts, damaged_metadata_keys, embedding_rows, slot_check_rows
from .namespaces import (
    bump_generation,
    delete_namespace,
    ensure_namespace,
    generations,
    namespaces_fingerprint,
    path_starts_with,
    select_namespaces,
)
from .readers import Reader
from .settings import pin_setting
from .spans import (
    hit_rows,
    insert_spans,
    slot_rows,
    span_ids_of_documents,
    span_ids_of_namespace,
)

__all__ = [
    "Reader",
    "adopt_parts",
    "bump_generation",
    "counts",
    "damaged_metadata_keys",
    "delete_documents",
    "delete_namespace",
    "document_ids",
    "document_rows",
    "document_rows_by_id",
    "embedding_rows",
    "ensure_namespace",
    "filtered_document_ids",
    "generations",
    "hit_rows",
    "index_metadata",
    "insert_document",
    "insert_spans",
    "namespaces_fingerprint",
    "namespaces_holding",
    "path_starts_with",
    "pin_setting",
    "replace_document",
    "select_namespaces",
    "set_metadata",
    "slot_check_rows",
    "slot_rows",
    "span_ids_of_documents",
    "span_ids_of_namespace",
]
