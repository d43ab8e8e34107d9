"""The SQL that ``MemoryStore`` reads and changes documents and spans with, grouped by domain.

Every statement that matches a caller's ids goes through ``store.id_lists`` (so a list of any
length works on both backends), and every read of document metadata takes the raw column
(``store.stored_metadata``), so that a damaged row is skipped with a warning instead of failing
the call. The functions run inside the caller's transaction and return plain rows and dicts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from sqlalchemy import Integer, cast, delete, func, literal, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from .filters import QUERY_WEIGHT, FilterNode, matching_ids
from .id_lists import chunks, distinct, rows_matching
from .namespaces import encode_path, path_key
from .schema import (
    DocumentRow,
    EmbeddingRow,
    NamespacePrefixRow,
    NamespaceRow,
    SettingRow,
    SlotRow,
    SpanRow,
)
from .stored_metadata import RAW_METADATA

__all__ = [
    "adopt_parts",
    "delete_documents",
    "document_ids",
    "document_rows",
    "document_rows_by_id",
    "filtered_document_ids",
    "hit_rows",
    "namespaces_holding",
    "path_starts_with",
    "set_metadata",
    "slot_rows",
    "span_ids_of_documents",
]

Reader = Session | Connection


# A prefix matches by equality on the leading characters of the encoded path, never LIKE: the
# encoding is prefix-free per label, so ("a",) cannot match ("ab",) (see store.namespaces).
def path_starts_with(length: Any, prefix: Any) -> Any:
    # Both positions cast: Postgres has substr(text, integer, integer) only, and a driver may
    # send a Python int as bigint.
    start, length = cast(literal(1), Integer), cast(length, Integer)
    return func.substr(NamespaceRow.path, start, length) == prefix


# ------------------------------------------------------------------ documents

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
            _id_array(
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


def _id_array(value: Any) -> np.ndarray:
    """An aggregated id list (a Postgres array, a SQLite JSON text) as an int64 array."""
    if value is None:
        return np.empty(0, np.int64)
    if isinstance(value, str):
        value = json.loads(value)
    return np.asarray(value, dtype=np.int64)


def span_ids_of_documents(session: Reader, doc_ids: Iterable[int]) -> list[int]:
    return [
        row.id
        for row in rows_matching(
            session, lambda piece: select(SpanRow.id).where(SpanRow.document_id.in_(piece)), doc_ids
        )
    ]


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


# ------------------------------------------------------------------ spans

_HIT_COLUMNS = select(
    SpanRow.id,
    SpanRow.namespace_id,
    SpanRow.position,
    SpanRow.char_start,
    SpanRow.char_end,
    SpanRow.text,
    DocumentRow.key,
    RAW_METADATA,
    DocumentRow.source,
).join(DocumentRow, SpanRow.document_id == DocumentRow.id)


def hit_rows(session: Reader, span_ids: Iterable[int], ns_ids: Iterable[int]) -> dict[int, Any]:
    """The rows of the given spans that live in one of the given namespaces, by span id. The
    namespace test runs here rather than as a second ``IN`` list: a prefix may cover any
    number of namespaces."""
    allowed = set(ns_ids)
    found = rows_matching(
        session, lambda piece: _HIT_COLUMNS.where(SpanRow.id.in_(piece)), span_ids
    )
    return {row.id: row for row in found if row.namespace_id in allowed}


_SLOT_COLUMNS = (
    select(
        SlotRow.span_id,
        SlotRow.blob,
        SlotRow.codec,
        SlotRow.rows,
        SlotRow.cols,
        SpanRow.position,
        SpanRow.token_count,
        DocumentRow.key,
    )
    .join(SpanRow, SlotRow.span_id == SpanRow.id)
    .join(DocumentRow, SpanRow.document_id == DocumentRow.id)
)


def slot_rows(
    session: Reader, span_ids: Iterable[int], prefix: tuple[str, ...] | None
) -> dict[int, Any]:
    """The slot rows of the given spans, by span id; with ``prefix``, only spans under it."""
    statement = _SLOT_COLUMNS
    if prefix is not None:
        path = encode_path(prefix)
        statement = (
            statement.join(NamespaceRow, SpanRow.namespace_id == NamespaceRow.id)
            .join(NamespacePrefixRow, NamespacePrefixRow.namespace_id == NamespaceRow.id)
            .where(
                NamespacePrefixRow.prefix_key == path_key(path),
                path_starts_with(len(path), path),
            )
        )
    found = rows_matching(
        session, lambda piece: statement.where(SlotRow.span_id.in_(piece)), span_ids
    )
    return {row.span_id: row for row in found}
