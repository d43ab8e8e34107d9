"""Namespaces: finding them by path or prefix, creating them, and their generation counter.

The generation is the sequence number that keeps the rows and the index rooms in step: every
write to a namespace increments it in the write's own transaction (``bump_generation``), and each
FAISS shard records the generation it reflects (``store.shards``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Integer, bindparam, cast, delete, func, literal, select, update
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ..namespaces import encode_path, path_key, prefix_keys
from ..schema import DocumentRow, NamespacePrefixRow, NamespaceRow, SettingRow
from .readers import Reader

__all__ = [
    "bump_generation",
    "delete_namespace",
    "ensure_namespace",
    "generations",
    "namespaces_fingerprint",
    "path_starts_with",
    "select_namespaces",
]


# A prefix matches by equality on the leading characters of the encoded path, never LIKE: the
# encoding is prefix-free per label, so ("a",) cannot match ("ab",) (see store.namespaces).
def path_starts_with(length: Any, prefix: Any) -> Any:
    # Both positions cast: Postgres has substr(text, integer, integer) only, and a driver may
    # send a Python int as bigint.
    start, length = cast(literal(1), Integer), cast(length, Integer)
    return func.substr(NamespaceRow.path, start, length) == prefix


# Statements on the search path are built once: composing a select() costs more than running it.
_NAMESPACE_COLUMNS = select(NamespaceRow.id, NamespaceRow.path, NamespaceRow.generation)
_ALL_NAMESPACES = _NAMESPACE_COLUMNS.order_by(NamespaceRow.id)
# Found through the indexed prefix table, and checked against the path itself.
_NAMESPACES_UNDER_PREFIX = (
    _NAMESPACE_COLUMNS.join(NamespacePrefixRow, NamespacePrefixRow.namespace_id == NamespaceRow.id)
    .where(
        NamespacePrefixRow.prefix_key == bindparam("prefix_key"),
        path_starts_with(bindparam("length"), bindparam("prefix")),
    )
    .order_by(NamespaceRow.id)
)
_NAMESPACE_EXACTLY = _NAMESPACE_COLUMNS.where(NamespaceRow.path_key == bindparam("path_key"))


def select_namespaces(session: Reader, ns: tuple[str, ...], *, exact: bool = False) -> list[Any]:
    """The namespace rows (id, path, generation) under a prefix (``()``: all of them), or with
    ``exact`` only ``ns`` itself; by id."""
    if not ns:
        return list(session.execute(_ALL_NAMESPACES))
    path = encode_path(ns)
    if exact:
        return list(session.execute(_NAMESPACE_EXACTLY, {"path_key": path_key(path)}))
    parameters = {"prefix_key": path_key(path), "length": len(path), "prefix": path}
    return list(session.execute(_NAMESPACES_UNDER_PREFIX, parameters))


_FINGERPRINT_COLUMNS = select(
    func.count(),
    func.coalesce(func.sum(NamespaceRow.id), 0),
    func.coalesce(func.sum(NamespaceRow.generation), 0),
)
_ALL_FINGERPRINT = _FINGERPRINT_COLUMNS.select_from(NamespaceRow)
_FINGERPRINT_UNDER_PREFIX = _FINGERPRINT_COLUMNS.join_from(
    NamespaceRow, NamespacePrefixRow, NamespacePrefixRow.namespace_id == NamespaceRow.id
).where(
    NamespacePrefixRow.prefix_key == bindparam("prefix_key"),
    path_starts_with(bindparam("length"), bindparam("prefix")),
)


def namespaces_fingerprint(session: Reader, ns: tuple[str, ...]) -> tuple[int, int, int]:
    """(count, sum of ids, sum of generations) of the namespaces under a prefix (``()``: all):
    one aggregate row that changes whenever ``select_namespaces(ns)`` would answer otherwise.
    A write to a namespace grows its generation; a namespace created under the prefix takes an
    id above every id handed out before (ids are never reused), so creating as many as were
    deleted still moves the sum of ids, and creating or deleting any other number moves the
    count."""
    if not ns:
        row = session.execute(_ALL_FINGERPRINT).one()
    else:
        path = encode_path(ns)
        parameters = {"prefix_key": path_key(path), "length": len(path), "prefix": path}
        row = session.execute(_FINGERPRINT_UNDER_PREFIX, parameters).one()
    return int(row[0]), int(row[1]), int(row[2])


def generations(session: Reader, ns_ids: list[int]) -> list[tuple[int, int]]:
    """(id, generation) of the given namespaces that exist."""
    statement = select(NamespaceRow.id, NamespaceRow.generation)
    rows = session.execute(statement.where(NamespaceRow.id.in_(ns_ids)))
    return [(int(ns_id), int(generation)) for ns_id, generation in rows]


def ensure_namespace(session: Any, dialect: str, ns: tuple[str, ...]) -> int:
    """The id of a namespace, created (and listed under each of its prefixes) when new.
    Concurrent creators race safely: the insert that loses does nothing and reads the winner."""
    path = encode_path(ns)
    key = path_key(path)
    insert = postgres_insert if dialect == "postgresql" else sqlite_insert
    created = session.scalar(
        insert(NamespaceRow)
        .values(path=path, depth=len(ns), path_key=key, generation=0)
        .on_conflict_do_nothing()
        .returning(NamespaceRow.id)
    )
    if created is not None:
        session.execute(
            NamespacePrefixRow.__table__.insert(),
            [{"prefix_key": k, "namespace_id": created} for k in prefix_keys(ns)],
        )
        return created
    return session.execute(select(NamespaceRow.id).where(NamespaceRow.path_key == key)).scalar_one()


def bump_generation(session: Any, ns_id: int) -> int:
    """Move a namespace's generation on by one in the caller's write; returns the new one."""
    return session.execute(
        update(NamespaceRow)
        .where(NamespaceRow.id == ns_id)
        .values(generation=NamespaceRow.generation + 1)
        .returning(NamespaceRow.generation)
    ).scalar_one()


def delete_namespace(session: Any, ns_id: int, settings_prefix: str) -> int:
    """Delete a namespace with everything in it (documents, spans, slots and embeddings
    cascade) and the settings rows under ``settings_prefix`` (its index tokens); returns the
    number of documents it held."""
    documents = session.execute(
        select(func.count()).where(DocumentRow.namespace_id == ns_id)
    ).scalar_one()
    session.execute(delete(NamespaceRow).where(NamespaceRow.id == ns_id))
    session.execute(delete(SettingRow).where(SettingRow.key.startswith(settings_prefix)))
    return int(documents)
