"""Documents: by key or row id, filtered by metadata, written, their metadata replaced.

Every statement that matches a caller's ids goes through ``store.id_lists`` (so a list of any
length works on both backends), and every read of document metadata takes the raw column
(``store.stored_metadata``), so that a damaged row is skipped with a warning instead of failing
the call. Metadata is written with its value rows (``store.metadata_values``) in one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from ..filters import QUERY_WEIGHT, FilterNode, matching_ids
from ..id_lists import chunks, distinct, id_array, rows_matching
from ..metadata_values import value_rows
from ..schema import (
    DocumentRow,
    EmbeddingRow,
    MetadataValueRow,
    NamespaceRow,
    SettingRow,
    SpanRow,
)
from ..stored_metadata import RAW_METADATA
from .readers import Reader

__all__ = [
    "adopt_parts",
    "delete_documents",
    "document_ids",
    "document_rows",
    "document_rows_by_id",
    "filtered_document_ids",
    "index_metadata",
    "insert_document",
    "namespaces_holding",
    "replace_document",
    "set_metadata",
]


_SPAN_COUNT = (
    select(func.count(SpanRow.id)).where(SpanRow.document_id == DocumentRow.id).scalar_subquery()
)
_DOCUMENT_COLUMNS = select(
    DocumentRow.id,
    DocumentRow.key,
    DocumentRow.namespace_id,
    DocumentRow.source,
    RAW_METADATA,
    DocumentRow.content_hash,
    _SPAN_COUNT.label("span_count"),
)


def document_ids(session: Reader, ns_id: int, keys: Iterable[str]) -> dict[str, int]:
    """Row ids of the documents of one namespace with the given keys (absent keys left out)."""
    found = rows_matching(
        session,
        lambda piece: select(DocumentRow.key, DocumentRow.id).where(
            DocumentRow.namespace_id == ns_id, DocumentRow.key.in_(piece)
        ),
        keys,
    )
    return {key: doc_id for key, doc_id in found}


def document_rows(
    session: Reader, ns_ids: Sequence[int], keys: Iterable[str] | None = None
) -> list[Any]:
    """The documents of the given namespaces (only those with ``keys`` when given), in the order
    they were first added; metadata raw, for ``parse_metadata``."""
    wanted = None if keys is None else distinct(keys)
    rows: list[Any] = []
    for ns_piece in chunks(list(ns_ids)):
        statement = _DOCUMENT_COLUMNS.where(DocumentRow.namespace_id.in_(ns_piece))
        if wanted is None:
            rows.extend(session.execute(statement))
            continue
        for piece in chunks(wanted):
            rows.extend(session.execute(statement.where(DocumentRow.key.in_(piece))))
    return sorted(rows, key=lambda row: row.id)


def document_rows_by_id(session: Reader, doc_ids: Iterable[int]) -> list[Any]:
    """The documents with the given row ids, in the order they were first added."""
    found = rows_matching(
        session, lambda piece: _DOCUMENT_COLUMNS.where(DocumentRow.id.in_(piece)), doc_ids
    )
    return sorted(found, key=lambda row: row.id)


def filtered_document_ids(
    session: Reader, id_aggregate: Any, ns_ids: Sequence[int], where: FilterNode
) -> np.ndarray:
    """Row ids (sorted) of the documents of the given namespaces that match a compiled filter.

    ``id_aggregate`` is ``Database.id_aggregate``: the ids come back as one aggregated value
    per statement rather than a row each. Namespaces and wide filters are split over several
    statements of the caller's transaction (``store.id_lists``, ``filters.matching_ids``)."""
    aggregate = select(id_aggregate(DocumentRow.id))

    def run(condition: Any) -> np.ndarray:
        found = [
            id_array(
                session.scalar(aggregate.where(DocumentRow.namespace_id.in_(piece), condition))
            )
            for piece in chunks(list(ns_ids))
        ]
        return np.unique(np.concatenate(found)) if found else np.empty(0, np.int64)

    return matching_ids(where, run)


def namespaces_holding(
    session: Reader, id_aggregate: Any, ns_ids: Sequence[int], where: FilterNode
) -> set[int]:
    """The namespaces (of the given ids) holding at least one document that matches a filter.
    A filter that fits one statement is tested with ``EXISTS``, which stops at each
    namespace's first match: the cost follows the namespaces, not their documents."""
    if where.op != "leaf" and where.weight > QUERY_WEIGHT:
        ids = filtered_document_ids(session, id_aggregate, ns_ids, where)
        found = rows_matching(
            session,
            lambda piece: select(DocumentRow.namespace_id).where(DocumentRow.id.in_(piece)),
            ids.tolist(),
        )
        return {row.namespace_id for row in found}
    holds = (
        select(DocumentRow.id)
        .where(DocumentRow.namespace_id == NamespaceRow.id, where.where())
        .exists()
    )
    found = rows_matching(
        session,
        lambda piece: select(NamespaceRow.id).where(NamespaceRow.id.in_(piece), holds),
        ns_ids,
    )
    return {row.id for row in found}


def delete_documents(session: Session, doc_ids: Iterable[int]) -> None:
    """Delete documents (their spans, slots and embeddings cascade)."""
    for piece in chunks(distinct(doc_ids)):
        session.execute(delete(DocumentRow).where(DocumentRow.id.in_(piece)))


def set_metadata(session: Session, metadata: Mapping[int, Mapping[str, Any]]) -> None:
    """Overwrite documents' metadata by row id, whatever the rows held (damaged or not): the
    old value is never read."""
    if metadata:
        session.execute(
            update(DocumentRow),
            [{"id": doc_id, "metadata_": value} for doc_id, value in metadata.items()],
        )
        index_metadata(session, metadata)


def adopt_parts(
    session: Session, parts_ns_id: int, doc_id: int, ns_id: int, tokens: str
) -> list[int]:
    """Give every span of namespace ``parts_ns_id`` (with its slots and embedding) to document
    ``doc_id`` of namespace ``ns_id``, then drop the parts namespace, its part documents and its
    index tokens (settings keys starting with ``tokens``). Returns the spans' ids by position."""
    span_ids = list(
        session.scalars(
            select(SpanRow.id).where(SpanRow.namespace_id == parts_ns_id).order_by(SpanRow.position)
        )
    )
    session.execute(
        update(SpanRow)
        .where(SpanRow.namespace_id == parts_ns_id)
        .values(document_id=doc_id, namespace_id=ns_id)
    )
    session.execute(
        update(EmbeddingRow)
        .where(EmbeddingRow.namespace_id == parts_ns_id)
        .values(namespace_id=ns_id)
    )
    session.execute(delete(NamespaceRow).where(NamespaceRow.id == parts_ns_id))
    session.execute(delete(SettingRow).where(SettingRow.key.startswith(tokens)))
    return span_ids


def index_metadata(
    session: Session, metadata: Mapping[int, Mapping[str, Any]], *, new: bool = False
) -> None:
    """Write the metadata value rows (``store.metadata_values``) of documents by row id, in
    the transaction that writes their metadata, replacing their old rows unless ``new``."""
    if not new:
        for piece in chunks(list(metadata)):
            session.execute(delete(MetadataValueRow).where(MetadataValueRow.document_id.in_(piece)))
    rows = [row for doc_id, value in metadata.items() for row in value_rows(doc_id, value)]
    if rows:
        session.execute(MetadataValueRow.__table__.insert(), rows)


def insert_document(
    session: Session, ns_id: int, key: str, source: str, metadata: Any, content_hash: str
) -> int:
    """Insert a new document row; returns its row id (its metadata rows: ``index_metadata``)."""
    return session.execute(
        DocumentRow.__table__.insert()
        .values(
            namespace_id=ns_id,
            key=key,
            source=source,
            metadata=metadata,
            content_hash=content_hash,
        )
        .returning(DocumentRow.id)
    ).scalar_one()


def replace_document(
    session: Session, doc_id: int, source: str, metadata: Any, content_hash: str
) -> None:
    """Overwrite a document's fields and drop its spans (slots and embeddings cascade), so
    that the new spans can be inserted; the old metadata is never read."""
    session.execute(delete(SpanRow).where(SpanRow.document_id == doc_id))
    session.execute(
        update(DocumentRow)
        .where(DocumentRow.id == doc_id)
        .values(source=source, metadata_=metadata, content_hash=content_hash)
    )
