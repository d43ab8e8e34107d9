"""What the index room (``store.shards``) reads and writes: embeddings, the span -> document map
of namespaces, and the token rows that tie saved index files to this database."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from ..id_lists import id_array, rows_matching
from ..schema import EmbeddingRow, NamespaceRow, SettingRow, SpanRow
from .readers import Reader

__all__ = [
    "all_generations",
    "embedded_span_ids",
    "embeddings_of",
    "has_setting",
    "replace_setting",
    "span_documents",
]


def all_generations(session: Reader) -> list[tuple[int, int]]:
    """(id, generation) of every namespace, by id."""
    rows = session.execute(
        select(NamespaceRow.id, NamespaceRow.generation).order_by(NamespaceRow.id)
    )
    return [(int(ns_id), int(generation)) for ns_id, generation in rows]


def embedded_span_ids(session: Reader, ns_id: int) -> np.ndarray:
    """The span ids that have an embedding row in one namespace (unsorted)."""
    ids = session.scalars(select(EmbeddingRow.span_id).where(EmbeddingRow.namespace_id == ns_id))
    return np.fromiter(ids, dtype=np.int64)


def embeddings_of(session: Reader, ns_id: int, span_ids: np.ndarray) -> Iterator[tuple[int, bytes]]:
    """The stored embeddings of the given span ids (sorted) of one namespace. The ids an index
    lacks are mostly the newest, one run of ids, so they are read by id range (one index range
    scan) rather than as ``IN`` lists; ids in the range that were not asked for are skipped."""
    if not len(span_ids):
        return
    wanted = set(span_ids.tolist())
    rows = session.execute(
        select(EmbeddingRow.span_id, EmbeddingRow.vector).where(
            EmbeddingRow.namespace_id == ns_id,
            EmbeddingRow.span_id.between(int(span_ids[0]), int(span_ids[-1])),
        )
    )
    for span_id, vector in rows:
        if span_id in wanted:
            yield span_id, vector


def span_documents(
    session: Reader, id_aggregate: Callable[..., Any], ns_ids: Sequence[int]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each namespace holding spans: its span ids and their documents' row ids, aligned,
    aggregated in SQL (``Database.id_aggregate``), one statement per ``IN`` list."""
    found = {}
    for row in rows_matching(
        session,
        lambda piece: (
            select(
                SpanRow.namespace_id,
                id_aggregate(SpanRow.id, order_by=SpanRow.id),
                id_aggregate(SpanRow.document_id, order_by=SpanRow.id),
            )
            .where(SpanRow.namespace_id.in_(piece))
            .group_by(SpanRow.namespace_id)
        ),
        ns_ids,
    ):
        found[int(row[0])] = id_array(row[1]), id_array(row[2])
    return found


def has_setting(session: Reader, key: str) -> bool:
    return session.scalar(select(SettingRow.key).where(SettingRow.key == key)) is not None


def replace_setting(session: Session, old_key: str | None, key: str, value: str) -> None:
    """Write a settings row, deleting ``old_key``'s row (when given) in the same write."""
    if old_key is not None:
        session.execute(delete(SettingRow).where(SettingRow.key == old_key))
    session.execute(SettingRow.__table__.insert().values(key=key, value=value))
