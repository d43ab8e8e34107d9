"""Bad input and hostile conditions: each gets a clear error and leaves the store as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import icmem.store.database as database_module
import numpy as np
import pytest
from icmem.store import (
    DimensionMismatchError,
    DocumentRecord,
    ForeignSlotsError,
    InvalidRecordError,
    MemoryStore,
    NotAStoreError,
    ReadOnlyStoreError,
    SchemaVersionError,
    SpanRecord,
    StoreFullError,
)
from icmem.store.schema import MIGRATIONS, SchemaVersionRow
from sqlalchemy import event, insert, text
from store_testing import DIM, FINGERPRINT, StoreLocation, embedding, make_document, make_slots

NS = ("t", "a", "th")


def _snapshot(store: MemoryStore) -> tuple:
    """Everything a caller can observe: counts, ids, and search answers."""
    stats = store.stats()
    queries = [embedding(7000 + i) for i in range(3)]
    return (
        (stats.namespaces, stats.documents, stats.spans, stats.slot_bytes),
        store.span_ids(NS).tolist(),
        store.index_ids(NS).tolist(),
        [[(h.span_id, h.text) for h in store.search(q, 5, namespace=NS)] for q in queries],
    )


@pytest.fixture
def filled(store: MemoryStore) -> MemoryStore:
    store.add([make_document(f"d{i}", 3, seed=i) for i in range(4)], namespace=NS)
    return store


def _with_bad_span(**overrides) -> DocumentRecord:
    good = make_document("bad", 2, seed=50)
    span = good.spans[1]
    fields = {f: getattr(span, f) for f in span.__dataclass_fields__}
    fields.update(overrides)
    return DocumentRecord(id="bad", spans=[good.spans[0], SpanRecord(**fields)])


@pytest.mark.parametrize(
    ("bad_document", "error", "message"),
    [
        (_with_bad_span(embedding=np.ones(DIM + 1)), DimensionMismatchError, f"dim {DIM}"),
        (_with_bad_span(embedding=np.full(DIM, np.nan)), InvalidRecordError, "NaN"),
        (_with_bad_span(embedding=np.full(DIM, np.inf)), InvalidRecordError, "NaN or infinity"),
        (
            _with_bad_span(slots=make_slots(1, fingerprint="other-model")),
            ForeignSlotsError,
            "base model",
        ),
        (_with_bad_span(slots=make_slots(1)[:-5]), InvalidRecordError, "truncated"),
        (_with_bad_span(slots=b"not slots at all" * 4), InvalidRecordError, "magic"),
    ],
)
def test_bad_records_change_nothing(filled: MemoryStore, bad_document, error, message) -> None:
    before = _snapshot(filled)
    # The good document in the same call is not stored either: one call, one transaction.
    with pytest.raises(error, match=message):
        filled.add([make_document("good", 2, seed=60), bad_document], namespace=NS)
    assert _snapshot(filled) == before


def test_foreign_slots_refused_once_model_is_pinned(location: StoreLocation) -> None:
    with location.open(model_fingerprint=FINGERPRINT) as store:
        with pytest.raises(ForeignSlotsError, match="re-encode"):
            store.add([make_document("x", 1, fingerprint="someone-else")], namespace=NS)
        assert store.stats().documents == 0
    with pytest.raises(ForeignSlotsError, match="opened for 'someone-else'"):
        location.open(model_fingerprint="someone-else")


def test_first_slots_pin_the_model(store: MemoryStore) -> None:
    with pytest.raises(ForeignSlotsError, match="several base models"):
        store.add([make_document("a", 1), make_document("b", 1, fingerprint="other")], namespace=NS)
    store.add([make_document("a", 1)], namespace=NS)
    assert store.model_fingerprint == FINGERPRINT
    with pytest.raises(ForeignSlotsError):
        store.add([make_document("b", 1, fingerprint="other")], namespace=NS)


def test_bad_queries_and_arguments(filled: MemoryStore) -> None:
    with pytest.raises(DimensionMismatchError, match="length 3"):
        filled.search(np.ones(3), 5, namespace=NS)
    with pytest.raises(InvalidRecordError, match="NaN"):
        filled.search(np.full(DIM, np.nan), 5, namespace=NS)
    with pytest.raises(InvalidRecordError, match="positive int"):
        filled.search(embedding(0), 0, namespace=NS)
    with pytest.raises(InvalidRecordError, match="namespace"):
        filled.add([make_document("z", 1)], namespace=("t",) * 17)  # deeper than 16 labels
    with pytest.raises(InvalidRecordError, match="namespace"):
        filled.search(embedding(0), 1, namespace="tenant")
    with pytest.raises(InvalidRecordError, match="namespace"):
        filled.search(embedding(0), 1, namespace=("t", ""))
    with pytest.raises(InvalidRecordError, match="not one string"):
        filled.delete(namespace=NS, document_ids="d1")
    with pytest.raises(InvalidRecordError, match="twice"):
        filled.add([make_document("same", 1), make_document("same", 1)], namespace=NS)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"position": -1}, "position"),
        ({"char_start": 10, "char_end": 5}, "char offsets"),
        ({"slots": "text"}, "bytes"),
    ],
)
def test_malformed_span_records_are_refused(fields: dict, message: str) -> None:
    base = {
        "position": 0,
        "char_start": 0,
        "char_end": 1,
        "text": "x",
        "token_count": 1,
        "slots": make_slots(0),
        "embedding": embedding(0),
    }
    with pytest.raises(InvalidRecordError, match=message):
        SpanRecord(**{**base, **fields})


def test_duplicate_span_positions_are_refused() -> None:
    span = make_document("a", 1).spans[0]
    with pytest.raises(InvalidRecordError, match="duplicate span positions"):
        DocumentRecord(id="a", spans=[span, span])


def test_wrong_dim_on_open(location: StoreLocation) -> None:
    location.open().close()
    with pytest.raises(DimensionMismatchError, match=f"dim={DIM}"):
        location.open(dim=DIM * 2)


def test_things_that_are_not_stores(tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    with pytest.raises(NotAStoreError, match="is a file"):
        MemoryStore.open(a_file, dim=DIM)

    busy = tmp_path / "home"
    busy.mkdir()
    (busy / "photo.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(NotAStoreError, match="not empty"):
        MemoryStore.open(busy, dim=DIM)
    assert sorted(os.listdir(busy)) == ["photo.jpg"]

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "store.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(NotAStoreError, match="not a readable SQLite database"):
        MemoryStore.open(garbage, dim=DIM)

    other = tmp_path / "other-app"
    other.mkdir()
    with sqlite3.connect(other / "store.sqlite") as connection:
        connection.execute("CREATE TABLE users (id INTEGER)")
    with pytest.raises(NotAStoreError, match="other tables"):
        MemoryStore.open(other, dim=DIM)

    with pytest.raises(NotAStoreError, match="missing"):
        MemoryStore.open(tmp_path / "nothing-here", dim=DIM, read_only=True)
    with pytest.raises(NotAStoreError, match="not a sqlite:// URL"):
        MemoryStore.open(f"sqlite:///{tmp_path}/x.sqlite", dim=DIM)


def test_url_store_needs_an_index_dir() -> None:
    with pytest.raises(Exception, match="index_dir"):
        MemoryStore.open("postgresql+psycopg://nobody@127.0.0.1:1/none", dim=DIM)


def test_newer_schema_is_refused(location: StoreLocation) -> None:
    with location.open() as store, store.engine.begin() as connection:
        connection.execute(insert(SchemaVersionRow).values(version=99, icmem_version="9.9"))
    with pytest.raises(SchemaVersionError, match="version 99 by a newer icmem"):
        location.open()


def test_older_schema_without_migration_is_refused(location: StoreLocation) -> None:
    with location.open() as store, store.engine.begin() as connection:
        connection.execute(text("UPDATE icmem_schema_version SET version = 0"))
    with pytest.raises(SchemaVersionError, match="no migration from version 0"):
        location.open()


def test_older_schema_is_migrated_by_a_chain_of_steps_in_order(
    location: StoreLocation, monkeypatch
) -> None:
    with location.open() as store:
        store.add([make_document("kept", 2)], namespace=NS)
    applied = []

    def add_column(connection) -> None:
        applied.append(2)
        connection.execute(text("ALTER TABLE icmem_documents ADD COLUMN summary TEXT"))

    def fill_column(connection) -> None:
        applied.append(3)  # needs the column step 2 added
        connection.execute(text("UPDATE icmem_documents SET summary = 'filled'"))

    current = database_module.SCHEMA_VERSION
    monkeypatch.setattr(database_module, "SCHEMA_VERSION", current + 2)
    monkeypatch.setitem(MIGRATIONS, current, add_column)
    monkeypatch.setitem(MIGRATIONS, current + 1, fill_column)
    with location.open() as store:
        with store.engine.connect() as connection:
            versions = connection.execute(text("SELECT version FROM icmem_schema_version"))
            assert sorted(v for (v,) in versions) == [current, current + 1, current + 2]
            assert connection.execute(text("SELECT summary FROM icmem_documents")).all() == [
                ("filled",)
            ]
            connection.rollback()
        assert store.search(embedding(0), 1, namespace=NS)[0].document_id == "kept"
    assert applied == [2, 3]


def test_failing_migration_leaves_version_and_data_unchanged(
    location: StoreLocation, monkeypatch
) -> None:
    with location.open() as store:
        store.add([make_document("kept", 2)], namespace=NS)
    current = database_module.SCHEMA_VERSION

    def add_column(connection) -> None:
        connection.execute(text("ALTER TABLE icmem_documents ADD COLUMN summary TEXT"))
        connection.execute(text("DELETE FROM icmem_spans"))

    def fail(connection) -> None:
        raise RuntimeError("step 2 broke")

    monkeypatch.setattr(database_module, "SCHEMA_VERSION", current + 2)
    monkeypatch.setitem(MIGRATIONS, current, add_column)
    monkeypatch.setitem(MIGRATIONS, current + 1, fail)
    with pytest.raises(RuntimeError, match="step 2 broke"):
        location.open()
    monkeypatch.setattr(database_module, "SCHEMA_VERSION", current)
    with location.open() as store:
        with store.engine.connect() as connection:
            versions = connection.execute(text("SELECT version FROM icmem_schema_version"))
            assert max(v for (v,) in versions) == current
            columns = connection.execute(text("SELECT * FROM icmem_documents")).keys()
            assert "summary" not in columns
            connection.rollback()
        assert store.stats().spans == 2
        assert store.search(embedding(0), 1, namespace=NS)[0].document_id == "kept"


def test_full_database_rolls_back_the_whole_add(tmp_path: Path) -> None:
    # The failing write: SQLite is capped one page above its current size, so the next large
    # add runs out of room part-way, exactly as on a full disk (SQLITE_FULL).
    location = StoreLocation("sqlite", str(tmp_path / "store"), tmp_path / "store" / "index")
    store = location.open()
    store.add([make_document(f"d{i}", 3, seed=i) for i in range(4)], namespace=NS)
    before = _snapshot(store)
    with store.engine.connect() as connection:
        pages = connection.exec_driver_sql("PRAGMA page_count").scalar()
        connection.rollback()

    def cap(dbapi_connection, _record) -> None:
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages + 1}")

    event.listen(store.engine, "connect", cap)
    store.engine.dispose()
    big = [make_document(f"big{i}", 8, seed=100 + i) for i in range(100)]
    with pytest.raises(StoreFullError, match="rolled back"):
        store.add(big, namespace=NS)
    event.remove(store.engine, "connect", cap)
    store.engine.dispose()
    assert _snapshot(store) == before
    store.add(big, namespace=NS)  # once there is room again, the same add succeeds
    assert store.stats().documents == 104
    store.close()


def test_failing_index_write_keeps_previous_index(store: MemoryStore, location, monkeypatch):
    store.add([make_document("a", 2, seed=1)], namespace=NS)
    store.save_index()
    index_dir = Path(store._index.files.directory)
    saved = {p.name: p.read_bytes() for p in index_dir.iterdir()}
    store.add([make_document("b", 2, seed=2)], namespace=NS)

    def no_space(_fd) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StoreFullError, match="previous index file is untouched"):
        store.save_index()
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in index_dir.iterdir()} == saved  # no temp files left
    store.save_index()  # with room again, the retry writes the current index
    expected = _snapshot(store)
    store.close()
    with location.open() as reopened:
        assert _snapshot(reopened) == expected
        assert reopened.index_repairs == 0


def test_corrupt_or_missing_index_is_rebuilt(location: StoreLocation) -> None:
    with location.open() as store:
        store.add([make_document(f"d{i}", 3, seed=i) for i in range(6)], namespace=NS)
        expected = _snapshot(store)
        index_dir = Path(store._index.files.directory)
    index_file = next(index_dir.glob("*.faiss"))
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index_file.write_bytes(bytes(data))
    with location.open() as store:
        assert _snapshot(store) == expected
        assert store.index_repairs == 1
    for path in index_dir.iterdir():
        path.unlink()
    with location.open() as store:
        assert _snapshot(store) == expected
        assert store.index_repairs == 1
    manifest = next(index_dir.glob("*.json"))
    manifest.write_text(json.dumps({"format": 1, "dim": DIM + 1}))
    with location.open() as store:
        assert _snapshot(store) == expected
        assert store.index_repairs == 1


def test_stale_index_catches_up(location: StoreLocation) -> None:
    with location.open() as store:
        store.add([make_document(f"d{i}", 2, seed=i) for i in range(3)], namespace=NS)
        index_dir = Path(store._index.files.directory)
    old = {p: p.read_bytes() for p in index_dir.iterdir()}
    with location.open() as store:
        store.delete(namespace=NS, document_ids=["d0"])
        store.add([make_document("d9", 2, seed=9)], namespace=NS)
        expected = _snapshot(store)
    for path, data in old.items():
        path.write_bytes(data)  # an index that is internally valid but two writes behind
    with location.open() as store:
        assert _snapshot(store) == expected
        assert store.index_repairs == 1


READ_ONLY_PROBE = textwrap.dedent(
    """
    import json, os, pwd, sys
    import numpy as np
    from icmem.store import MemoryStore, ReadOnlyStoreError
    path, warm_copy, dim = sys.argv[1], sys.argv[2], int(sys.argv[3])
    query = np.array(json.loads(sys.argv[4]), dtype=np.float32)
    # Root ignores permission bits, so the probe drops to `nobody`. The interpreter lives under
    # /root, which `nobody` cannot read, so every code path is first run (as root) on a copy.
    with MemoryStore.open(warm_copy, dim=dim, read_only=True) as store:
        store.search(query, 3, namespace=("t", "a", "th"))
    nobody = pwd.getpwnam("nobody")
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    result = {}
    try:
        MemoryStore.open(path, dim=dim)
    except ReadOnlyStoreError as exc:
        result["error"] = str(exc)
    store = MemoryStore.open(path, dim=dim, read_only=True)
    result["hits"] = [h.span_id for h in store.search(query, 3, namespace=("t", "a", "th"))]
    try:
        store.delete(namespace=("t",))
    except ReadOnlyStoreError as exc:
        result["write_error"] = str(exc)
    store.close()
    print(json.dumps(result))
    """
)


def test_read_only_directory(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test runs as root and drops to `nobody` to make the directory read-only")
    base = Path(tempfile.mkdtemp(prefix="icmem-ro-"))
    try:
        os.chmod(base, 0o755)
        store = MemoryStore.open(base / "store", dim=DIM)
        store.add([make_document(f"d{i}", 2, seed=i) for i in range(3)], namespace=NS)
        query = embedding(101)
        expected = [h.span_id for h in store.search(query, 3, namespace=NS)]
        store.close()
        shutil.copytree(base / "store", tmp_path / "warm")
        listing = sorted((p.name, p.stat().st_size) for p in (base / "store").rglob("*"))
        argv = [str(base / "store"), str(tmp_path / "warm"), str(DIM), json.dumps(query.tolist())]
        result = subprocess.run(
            [sys.executable, "-c", READ_ONLY_PROBE, *argv],
            capture_output=True,
            text=True,
            cwd="/",
        )
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert "not writable" in answer["error"] and "read_only=True" in answer["error"]
        assert answer["hits"] == expected
        assert "read_only" in answer["write_error"]
        assert sorted((p.name, p.stat().st_size) for p in (base / "store").rglob("*")) == listing
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_read_only_open_refuses_writes(location: StoreLocation) -> None:
    with location.open() as store:
        store.add([make_document("a", 1)], namespace=NS)
    with location.open(read_only=True) as store:
        assert store.search(embedding(0), 1, namespace=NS)[0].document_id == "a"
        with pytest.raises(ReadOnlyStoreError, match="read_only"):
            store.add([make_document("b", 1)], namespace=NS)
