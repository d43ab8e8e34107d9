"""Spans: written with their slots and embeddings, read as search hits and slot rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..id_lists import rows_matching
from ..namespaces import encode_path, path_key
from ..schema import (
    DocumentRow,
    EmbeddingRow,
    NamespacePrefixRow,
    NamespaceRow,
    SlotRow,
    SpanRow,
)
from ..stored_metadata import RAW_METADATA
from .namespaces import path_starts_with
from .readers import Reader

__all__ = [
    "hit_rows",
    "insert_spans",
    "slot_rows",
    "span_ids_of_documents",
    "span_ids_of_namespace",
]


def span_ids_of_documents(session: Reader, doc_ids: Iterable[int]) -> list[int]:
    return [
        row.id
        for row in rows_matching(
            session, lambda piece: select(SpanRow.id).where(SpanRow.document_id.in_(piece)), doc_ids
        )
    ]


def span_ids_of_namespace(session: Reader, ns_id: int) -> np.ndarray:
    """The span ids of exactly one namespace; sorted."""
    ids = session.scalars(select(SpanRow.id).where(SpanRow.namespace_id == ns_id))
    return np.sort(np.fromiter(ids, dtype=np.int64))


def insert_spans(
    session: Session,
    ns_id: int,
    doc_id: int,
    spans: Sequence[Any],
    slot_rows: Sequence[dict[str, Any] | None],
    vectors: np.ndarray,
) -> list[int]:
    """Insert a document's spans (``SpanRecord``s), their slot rows (``None`` for a span
    without slots) and embeddings; returns the new span ids in the order given."""
    if not spans:
        return []
    span_ids = list(
        session.scalars(
            SpanRow.__table__.insert().returning(SpanRow.id, sort_by_parameter_order=True),
            [
                {
                    "document_id": doc_id,
                    "namespace_id": ns_id,
                    "position": s.position,
                    "char_start": s.char_start,
                    "char_end": s.char_end,
                    "text": s.text,
                    "token_count": s.token_count,
                    "content_id": s.content_id,
                }
                for s in spans
            ],
        )
    )
    slots = [
        {"span_id": span_id, **row}
        for span_id, row in zip(span_ids, slot_rows, strict=True)
        if row is not None
    ]
    if slots:
        session.execute(SlotRow.__table__.insert(), slots)
    session.execute(
        EmbeddingRow.__table__.insert(),
        [
            {"span_id": span_id, "namespace_id": ns_id, "vector": vector.astype("<f4").tobytes()}
            for span_id, vector in zip(span_ids, vectors, strict=True)
        ],
    )
    return span_ids


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
