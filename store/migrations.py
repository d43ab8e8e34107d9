"""Schema migrations: ``MIGRATIONS[n]`` upgrades a store from schema ``n`` to ``n + 1``.

Every step runs inside the transaction that opens the store, together with the version row it
adds, so a step that fails leaves the version and the data as they were. The DDL is written out
here rather than taken from ``store.schema``: a step must keep doing what it did when it was
written, whatever later schemas look like.

On SQLite a step may rebuild a table (SQLite cannot drop a column that a constraint names); the
opening transaction runs with ``PRAGMA foreign_keys=OFF`` so dropping the old table does not
cascade into its children, and each step checks the keys itself before it returns.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.engine import Connection

from .errors import SchemaVersionError
from .metadata_values import value_rows
from .namespaces import addressable_label, encode_path, path_key, prefix_keys

__all__ = ["MIGRATIONS"]


def _namespaces_as_paths(connection: Connection) -> None:
    """1 -> 2: the fixed (tenant, agent, thread) columns become an encoded label path of any
    depth. Namespace ids and generations are kept, so documents, spans, embeddings, saved index
    files and their tokens all stay valid: each old namespace is the 3-label path of its parts.
    A part that schema 1 stored but no call can address any more (empty, NUL, over 255
    characters) becomes its ``addressable_label`` stand-in, with a warning naming both."""
    rows = connection.execute(
        text("SELECT id, tenant, agent, thread, generation FROM icmem_namespaces ORDER BY id")
    ).all()
    values: list[dict[str, object]] = []
    prefixes: list[dict[str, object]] = []
    renamed: list[str] = []
    for ns_id, *parts, generation in rows:
        labels = tuple(addressable_label(part) for part in parts)
        if labels != tuple(parts):
            renamed.append(f"{tuple(parts)!r} -> {labels!r}")
        tenant, agent, thread = labels
        path = encode_path(labels)
        values.append(
            {
                "id": ns_id,
                "path": path,
                "depth": 3,
                "path_key": path_key(path),
                "generation": generation,
            }
        )
        prefixes.extend(
            {"prefix_key": key, "namespace_id": ns_id}
            for key in prefix_keys((tenant, agent, thread))
        )
    if renamed:
        warnings.warn(
            f"{len(renamed)} namespaces of this schema-1 store had labels that can no longer be "
            "addressed (empty, NUL or over 255 characters) and were renamed: "
            f"{'; '.join(renamed)}. Their documents are unchanged; address them by the new names",
            UserWarning,
            stacklevel=2,
        )
    if connection.dialect.name == "sqlite":
        _sqlite_namespaces_as_paths(connection, values)
    else:
        _postgres_namespaces_as_paths(connection, values)
    bigint = "INTEGER" if connection.dialect.name == "sqlite" else "BIGINT"
    connection.exec_driver_sql(
        "CREATE TABLE icmem_namespace_prefixes ("
        "prefix_key VARCHAR(64) NOT NULL, "
        f"namespace_id {bigint} NOT NULL, "
        "PRIMARY KEY (prefix_key, namespace_id), "
        "FOREIGN KEY(namespace_id) REFERENCES icmem_namespaces (id) ON DELETE CASCADE)"
    )
    connection.exec_driver_sql(
        "CREATE INDEX ix_icmem_namespace_prefixes_namespace "
        "ON icmem_namespace_prefixes (namespace_id)"
    )
    if prefixes:
        connection.execute(
            text(
                "INSERT INTO icmem_namespace_prefixes (prefix_key, namespace_id) "
                "VALUES (:prefix_key, :namespace_id)"
            ),
            prefixes,
        )


def _sqlite_namespaces_as_paths(connection: Connection, values: list[dict]) -> None:
    if connection.exec_driver_sql("PRAGMA foreign_keys").scalar():
        # Dropping the old table would delete every document through ON DELETE CASCADE.
        raise SchemaVersionError(
            "internal error: the SQLite migration must run with foreign keys off; nothing changed"
        )
    sequence = connection.exec_driver_sql(
        "SELECT seq FROM sqlite_sequence WHERE name = 'icmem_namespaces'"
    ).scalar()
    connection.exec_driver_sql(
        "CREATE TABLE icmem_namespaces_v2 ("
        "id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, "
        "path TEXT NOT NULL, "
        "depth INTEGER NOT NULL, "
        "path_key VARCHAR(64) NOT NULL, "
        "generation BIGINT NOT NULL, "
        "CONSTRAINT uq_icmem_namespace_path UNIQUE (path_key))"
    )
    if values:
        connection.execute(
            text(
                "INSERT INTO icmem_namespaces_v2 (id, path, depth, path_key, generation) "
                "VALUES (:id, :path, :depth, :path_key, :generation)"
            ),
            values,
        )
    connection.exec_driver_sql("DROP TABLE icmem_namespaces")
    connection.exec_driver_sql("ALTER TABLE icmem_namespaces_v2 RENAME TO icmem_namespaces")
    if sequence is not None:  # ids of deleted namespaces stay retired
        connection.execute(
            text("UPDATE sqlite_sequence SET seq = max(seq, :seq) WHERE name = 'icmem_namespaces'"),
            {"seq": sequence},
        )
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if broken:
        raise SchemaVersionError(
            f"migrating the namespaces left {len(broken)} rows without their namespace "
            f"(first: {tuple(broken[0])}); nothing was changed"
        )


def _postgres_namespaces_as_paths(connection: Connection, values: list[dict]) -> None:
    connection.exec_driver_sql(
        "ALTER TABLE icmem_namespaces ADD COLUMN path TEXT, ADD COLUMN depth INTEGER, "
        "ADD COLUMN path_key VARCHAR(64)"
    )
    if values:
        connection.execute(
            text(
                "UPDATE icmem_namespaces SET path = :path, depth = :depth, path_key = :path_key "
                "WHERE id = :id"
            ),
            values,
        )
    connection.exec_driver_sql(
        "ALTER TABLE icmem_namespaces DROP CONSTRAINT uq_icmem_namespace, "
        "DROP COLUMN tenant, DROP COLUMN agent, DROP COLUMN thread, "
        "ALTER COLUMN path SET NOT NULL, ALTER COLUMN depth SET NOT NULL, "
        "ALTER COLUMN path_key SET NOT NULL, "
        "ADD CONSTRAINT uq_icmem_namespace_path UNIQUE (path_key)"
    )


def _metadata_values(connection: Connection) -> None:
    """2 -> 3: index every document's metadata scalars (``store.metadata_values``) so that
    filters look documents up instead of parsing all of them. Damaged metadata gets no rows:
    reads leave it out anyway, and the write that repairs it adds them."""
    bigint = "INTEGER" if connection.dialect.name == "sqlite" else "BIGINT"
    connection.exec_driver_sql(
        "CREATE TABLE icmem_metadata_values ("
        f"document_id {bigint} NOT NULL, "
        "path BIGINT NOT NULL, "
        "value BIGINT NOT NULL, "
        "number FLOAT, "
        "PRIMARY KEY (document_id, path), "
        "FOREIGN KEY(document_id) REFERENCES icmem_documents (id) ON DELETE CASCADE)"
    )
    connection.exec_driver_sql(
        "CREATE INDEX ix_icmem_metadata_values_value "
        "ON icmem_metadata_values (path, value, document_id)"
    )
    connection.exec_driver_sql(
        "CREATE INDEX ix_icmem_metadata_values_number "
        "ON icmem_metadata_values (path, number, document_id)"
    )
    raw = "CAST(metadata AS TEXT)" if connection.dialect.name == "postgresql" else "metadata"
    page = text(f"SELECT id, {raw} FROM icmem_documents WHERE id > :after ORDER BY id LIMIT 1000")
    insert = text(
        "INSERT INTO icmem_metadata_values (document_id, path, value, number) "
        "VALUES (:document_id, :path, :value, :number)"
    )
    after = 0
    while documents := connection.execute(page, {"after": after}).all():
        rows: list[dict[str, object]] = []
        for document_id, metadata in documents:
            try:
                parsed = json.loads(metadata)
            except (TypeError, ValueError):
                continue  # damaged: left out of reads until a write repairs it
            rows.extend(value_rows(document_id, parsed))
        if rows:
            connection.execute(insert, rows)
        after = documents[-1][0]


MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _namespaces_as_paths,
    2: _metadata_values,
}
