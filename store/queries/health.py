"""Counts and sizes of namespaces, and the rows ``MemoryStore.check`` reads to find damage."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from ..id_lists import chunks
from ..schema import DocumentRow, EmbeddingRow, SlotRow, SpanRow
from ..stored_metadata import damaged_metadata
from .readers import Reader

__all__ = ["counts", "damaged_metadata_keys", "embedding_rows", "slot_check_rows"]


def counts(session: Reader, ns_ids: Sequence[int]) -> tuple[int, int, int, int]:
    """(documents, spans, slot bytes, embedding bytes) of the given namespaces."""
    documents = spans = slot_bytes = embedding_bytes = 0
    for chunk in chunks(list(ns_ids)):
        documents += session.execute(
            select(func.count()).where(DocumentRow.namespace_id.in_(chunk))
        ).scalar_one()
        spans += session.execute(
            select(func.count()).where(SpanRow.namespace_id.in_(chunk))
        ).scalar_one()
        slot_bytes += session.execute(
            select(func.coalesce(func.sum(func.length(SlotRow.blob)), 0))
            .join(SpanRow, SlotRow.span_id == SpanRow.id)
            .where(SpanRow.namespace_id.in_(chunk))
        ).scalar_one()
        embedding_bytes += session.execute(
            select(func.coalesce(func.sum(func.length(EmbeddingRow.vector)), 0)).where(
                EmbeddingRow.namespace_id.in_(chunk)
            )
        ).scalar_one()
    return int(documents), int(spans), int(slot_bytes), int(embedding_bytes)


def slot_check_rows(session: Connection, ns_ids: Sequence[int]) -> Iterator[Any]:
    """Every slot row (span id, blob, codec, rows, cols) of the namespaces, streamed."""
    streaming = session.execution_options(yield_per=64)
    for chunk in chunks(list(ns_ids)):
        yield from streaming.execute(
            select(SlotRow.span_id, SlotRow.blob, SlotRow.codec, SlotRow.rows, SlotRow.cols)
            .join(SpanRow, SlotRow.span_id == SpanRow.id)
            .where(SpanRow.namespace_id.in_(chunk))
        )


def embedding_rows(session: Connection, ns_ids: Sequence[int]) -> Iterator[tuple[int, bytes]]:
    """Every (span id, stored vector) of the namespaces, streamed."""
    streaming = session.execution_options(yield_per=64)
    for chunk in chunks(list(ns_ids)):
        yield from streaming.execute(
            select(EmbeddingRow.span_id, EmbeddingRow.vector).where(
                EmbeddingRow.namespace_id.in_(chunk)
            )
        )


def damaged_metadata_keys(
    session: Reader, dialect: str, ns_ids: Sequence[int]
) -> list[tuple[int, str]]:
    """(namespace id, document key) of the documents whose metadata is damaged."""
    found: list[tuple[int, str]] = []
    for chunk in chunks(list(ns_ids)):
        found.extend(
            session.execute(
                select(DocumentRow.namespace_id, DocumentRow.key).where(
                    DocumentRow.namespace_id.in_(chunk), damaged_metadata(dialect)
                )
            )
        )
    return found
