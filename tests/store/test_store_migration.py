"""A store written by schema 1 (fixed tenant/agent/thread columns; fixtures/v1-store, made by
fixtures/make_v1_store.py) is migrated on a writable open to namespace paths, with its index,
and answers the searches it answered before."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from icmem.store import MemoryStore, SchemaVersionError
from icmem.store.schema import (
    SCHEMA_VERSION,
    DocumentRow,
    EmbeddingRow,
    SchemaVersionRow,
    SettingRow,
    SlotRow,
    SpanRow,
)
from postgres_testing import PostgresServer
from sqlalchemy import create_engine, inspect, select, text

FIXTURES = Path(__file__).with_name("fixtures")
V1_STORE = FIXTURES / "v1-store"
EXPECTED = json.loads((FIXTURES / "v1-expected.json").read_text())
DIM = EXPECTED["dim"]


def _query(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def _assert_answers_as_before(store: MemoryStore) -> None:
    assert store.list_namespaces() == [tuple(ns) for ns in EXPECTED["namespaces"]]
    for name, ids in EXPECTED["index_ids"].items():
        ns = tuple(name.split("/"))
        assert store.index_ids(ns).tolist() == ids
        assert store.span_ids(ns).tolist() == ids
    for case in EXPECTED["searches"]:
        hits = store.search(
            _query(case["query_seed"]), 4, namespace=tuple(case["namespace"]), filter=case["filter"]
        )
        got = [(h.span_id, h.document_id, list(h.namespace)) for h in hits]
        want = [(h["span_id"], h["document_id"], h["namespace"]) for h in case["hits"]]
        assert got == want, case
        assert [h.score for h in hits] == pytest.approx([h["score"] for h in case["hits"]])


def _copy_fixture(tmp_path: Path) -> Path:
    target = tmp_path / "store"
    shutil.copytree(V1_STORE, target)
    return target


def test_fixture_is_schema_1() -> None:
    with sqlite3.connect(f"file:{V1_STORE / 'store.sqlite'}?mode=ro", uri=True) as connection:
        assert connection.execute("SELECT max(version) FROM icmem_schema_version").fetchone() == (
            1,
        )
        columns = [row[1] for row in connection.execute("PRAGMA table_info(icmem_namespaces)")]
    assert columns == ["id", "tenant", "agent", "thread", "generation"]


def test_v1_store_is_migrated_with_its_index(tmp_path: Path) -> None:
    path = _copy_fixture(tmp_path)
    with MemoryStore.open(path, dim=DIM) as store:
        with store.engine.connect() as connection:
            versions = [v for (v,) in connection.execute(select(SchemaVersionRow.version))]
            assert sorted(versions) == list(range(1, SCHEMA_VERSION + 1))  # one row a step
            columns = [c["name"] for c in inspect(connection).get_columns("icmem_namespaces")]
            assert columns == ["id", "path", "depth", "path_key", "generation"]
            assert connection.exec_driver_sql("PRAGMA foreign_key_check").all() == []
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            prefixes = connection.scalar(text("SELECT count(*) FROM icmem_namespace_prefixes"))
            assert prefixes == 3 * len(EXPECTED["namespaces"])
            connection.rollback()
        _assert_answers_as_before(store)
        # The saved index files were kept (namespace ids did not change): nothing was rebuilt.
        assert store.index_repairs == 0
        assert store.check().ok
        # The migrated store works as a new one: deeper namespaces, cascading deletes.
        store.add(_documents("new"), namespace=("acme", "bot", "t1", "deeper"))
        assert ("acme", "bot", "t1", "deeper") in store.list_namespaces(("acme", "bot", "t1"))
        assert store.delete(namespace=("acme", "bot")) == 6
        with store.engine.connect() as connection:
            assert connection.scalar(text("SELECT count(*) FROM icmem_spans")) == 14
            connection.rollback()
    with MemoryStore.open(path, dim=DIM, read_only=True) as store:
        assert store.list_namespaces() == [("acme", "helper", "t1"), ("beta", "bot", "t1")]


def test_migration_keeps_deleted_namespace_ids_retired(tmp_path: Path) -> None:
    path = _copy_fixture(tmp_path)
    with sqlite3.connect(path / "store.sqlite") as connection:  # a 5th namespace, then deleted
        connection.execute("UPDATE sqlite_sequence SET seq = 9 WHERE name = 'icmem_namespaces'")
    with MemoryStore.open(path, dim=DIM) as store:
        store.add(_documents("new"), namespace=("fresh",))
        with store.engine.connect() as connection:
            new_id = connection.scalar(text("SELECT max(id) FROM icmem_namespaces"))
            connection.rollback()
    assert new_id == 10


def test_read_only_open_of_v1_store_is_refused(tmp_path: Path) -> None:
    path = _copy_fixture(tmp_path)
    with pytest.raises(SchemaVersionError, match="open it once without read_only=True"):
        MemoryStore.open(path, dim=DIM, read_only=True)
    with sqlite3.connect(path / "store.sqlite") as connection:  # untouched
        assert connection.execute("SELECT max(version) FROM icmem_schema_version").fetchone() == (
            1,
        )


def test_failing_migration_changes_nothing(tmp_path: Path, monkeypatch) -> None:
    from icmem.store import migrations

    path = _copy_fixture(tmp_path)

    def half_then_fail(connection) -> None:
        migrations._namespaces_as_paths(connection)
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(migrations.MIGRATIONS, 1, half_then_fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        MemoryStore.open(path, dim=DIM)
    with sqlite3.connect(path / "store.sqlite") as connection:
        assert connection.execute("SELECT max(version) FROM icmem_schema_version").fetchone() == (
            1,
        )
        columns = [row[1] for row in connection.execute("PRAGMA table_info(icmem_namespaces)")]
        assert columns == ["id", "tenant", "agent", "thread", "generation"]
        assert connection.execute("SELECT count(*) FROM icmem_spans").fetchone() == (28 - 3,)
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        assert "icmem_namespace_prefixes" not in tables
    monkeypatch.undo()
    with MemoryStore.open(path, dim=DIM) as store:  # the real migration still works after
        _assert_answers_as_before(store)


def _documents(key: str):
    from icmem.store import DocumentRecord, SpanRecord

    return [
        DocumentRecord(
            id=key,
            spans=[
                SpanRecord(
                    position=0,
                    char_start=0,
                    char_end=1,
                    text="x",
                    token_count=1,
                    slots=None,
                    embedding=_query(7),
                )
            ],
        )
    ]


# ---------------------------------------------------------------- Postgres

_V1_NAMESPACES_DDL = (
    "CREATE TABLE icmem_namespaces (id BIGSERIAL NOT NULL, tenant VARCHAR(255) NOT NULL, "
    "agent VARCHAR(255) NOT NULL, thread VARCHAR(255) NOT NULL, generation BIGINT NOT NULL, "
    "PRIMARY KEY (id), CONSTRAINT uq_icmem_namespace UNIQUE (tenant, agent, thread))"
)


def _v1_postgres_store(server: PostgresServer, index_dir: Path) -> str:
    """The fixture's rows in a Postgres database laid out as schema 1 created it: today's tables
    with the v1 namespace table, and the fixture's index files (their tokens are in the rows)."""
    url = server.create_database()
    with MemoryStore.open(url, dim=DIM, index_dir=index_dir):
        pass
    shutil.rmtree(index_dir)
    shutil.copytree(V1_STORE / "index", index_dir)
    source = create_engine(f"sqlite:///file:{V1_STORE / 'store.sqlite'}?mode=ro&uri=true")
    target = create_engine(url)
    with source.connect() as old, target.begin() as new:
        new.exec_driver_sql(
            "ALTER TABLE icmem_documents DROP CONSTRAINT icmem_documents_namespace_id_fkey"
        )
        new.exec_driver_sql("ALTER TABLE icmem_spans DROP CONSTRAINT icmem_spans_namespace_id_fkey")
        new.exec_driver_sql(
            "ALTER TABLE icmem_embeddings DROP CONSTRAINT icmem_embeddings_namespace_id_fkey"
        )
        new.exec_driver_sql("DROP TABLE icmem_namespace_prefixes")  # schema 2 added it
        new.exec_driver_sql("DROP TABLE icmem_metadata_values")  # schema 3 added it
        new.exec_driver_sql("DROP TABLE icmem_namespaces")
        new.exec_driver_sql(_V1_NAMESPACES_DDL)
        for table, column in (
            ("icmem_documents", "namespace_id"),
            ("icmem_spans", "namespace_id"),
            ("icmem_embeddings", "namespace_id"),
        ):
            new.exec_driver_sql(
                f"ALTER TABLE {table} ADD CONSTRAINT {table}_{column}_fkey FOREIGN KEY ({column}) "
                "REFERENCES icmem_namespaces (id) ON DELETE CASCADE"
            )
        new.execute(text("DELETE FROM icmem_settings"))
        new.execute(text("UPDATE icmem_schema_version SET version = 1"))
        rows = old.execute(
            text("SELECT id, tenant, agent, thread, generation FROM icmem_namespaces")
        )
        new.execute(
            text(
                "INSERT INTO icmem_namespaces (id, tenant, agent, thread, generation) "
                "VALUES (:id, :tenant, :agent, :thread, :generation)"
            ),
            [row._asdict() for row in rows],
        )
        for model in (SettingRow, DocumentRow, SpanRow, SlotRow, EmbeddingRow):
            table = model.__table__
            rows = [row._asdict() for row in old.execute(select(table))]
            new.execute(table.insert(), rows)
        for table in ("icmem_namespaces", "icmem_documents", "icmem_spans"):
            new.exec_driver_sql(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT max(id) FROM {table}))"
            )
    source.dispose()
    target.dispose()
    return url


@pytest.mark.postgres
def test_v1_postgres_store_is_migrated_with_its_index(postgres_server, tmp_path: Path) -> None:
    index_dir = tmp_path / "pg-index"
    url = _v1_postgres_store(postgres_server, index_dir)
    try:
        with pytest.raises(SchemaVersionError, match="open it once without read_only=True"):
            MemoryStore.open(url, dim=DIM, index_dir=index_dir, read_only=True)
        with MemoryStore.open(url, dim=DIM, index_dir=index_dir) as store:
            with store.engine.connect() as connection:
                versions = [v for (v,) in connection.execute(select(SchemaVersionRow.version))]
                assert sorted(versions) == list(range(1, SCHEMA_VERSION + 1))  # one row a step
                columns = {c["name"] for c in inspect(connection).get_columns("icmem_namespaces")}
                assert columns == {"id", "path", "depth", "path_key", "generation"}
                prefixes = connection.scalar(text("SELECT count(*) FROM icmem_namespace_prefixes"))
                assert prefixes == 3 * len(EXPECTED["namespaces"])
                connection.rollback()
            _assert_answers_as_before(store)
            assert store.index_repairs == 0
            store.add(_documents("new"), namespace=("acme", "bot", "t1", "deeper"))
            assert store.delete(namespace=("acme", "bot")) == 6
            assert store.stats().spans == 14
    finally:
        postgres_server.drop_databases()


def test_connections_keep_foreign_keys_after_a_migration(tmp_path: Path) -> None:
    """The migration runs with foreign keys off; the pooled connection it used must get them
    back, or later deletes would leave orphan rows instead of cascading."""
    path = _copy_fixture(tmp_path)
    with MemoryStore.open(path, dim=DIM) as store:
        for _ in range(3):  # whichever pooled connection comes back
            with store.engine.connect() as connection:
                assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
                connection.rollback()
        assert store.delete(namespace=("beta",)) == 3
        with store.engine.connect() as connection:
            orphans = connection.scalar(
                text(
                    "SELECT count(*) FROM icmem_spans WHERE namespace_id NOT IN "
                    "(SELECT id FROM icmem_namespaces)"
                )
            )
            connection.rollback()
        assert orphans == 0
