"""Damaged, emptied, restored and read-only stores: the store never mistakes one for a new store,
never trusts an index built from another database, and never lets one bad row take reads down."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from icmem.store import (
    DocumentRecord,
    InvalidRecordError,
    MemoryStore,
    NotAStoreError,
    SpanRecord,
    StoreDamageWarning,
)
from icmem.store.schema import SlotRow
from sqlalchemy import select, update
from store_testing import DIM, FINGERPRINT, StoreLocation, embedding, make_document

from icmem.cli import build_parser
from icmem.codec import decode_slots

NS = ("t", "a", "th")


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def _cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_emptied_database_is_never_recreated(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with MemoryStore.open(path, dim=DIM) as store:
        store.add([make_document(f"d{i}", 2, seed=i) for i in range(3)], namespace=NS)
    (path / "store.sqlite").write_bytes(b"")  # emptied by a bad copy, a full disk, a tool
    before = _files(path)
    for read_only in (False, True):
        with pytest.raises(NotAStoreError, match=r"empty \(0 bytes\).*backup"):
            MemoryStore.open(path, dim=DIM, read_only=read_only)
    with pytest.raises(NotAStoreError, match="empty"):
        _cli(["store", "reindex", str(path), "--dim", str(DIM)])
    assert _files(path) == before  # nothing was initialised, the index is untouched


def test_emptied_database_with_a_stale_wal_is_refused(tmp_path: Path) -> None:
    """A 0-byte database beside a WAL that still holds pages (a writer was killed, then the file
    was emptied): opening must not replay the WAL into the empty file and delete it."""
    path = tmp_path / "store"
    with MemoryStore.open(path, dim=DIM) as store:
        store.add([make_document(f"d{i}", 2, seed=i) for i in range(3)], namespace=NS)
    writer = _writer(path, "kill")
    writer.communicate(timeout=120)
    assert writer.returncode == -9
    assert (path / "store.sqlite-wal").stat().st_size > 0
    (path / "store.sqlite").write_bytes(b"")
    before = _files(path)
    for read_only in (False, True):
        with pytest.raises(
            NotAStoreError, match=r"empty \(0 bytes\).*store\.sqlite-wal.*untouched"
        ):
            MemoryStore.open(path, dim=DIM, read_only=read_only)
    assert _files(path) == before  # the WAL, the only copy of its pages, is still there


def test_index_without_database_is_not_a_new_store(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with MemoryStore.open(path, dim=DIM) as store:
        store.add([make_document("a", 2)], namespace=NS)
    (path / "store.sqlite").unlink()
    before = _files(path)
    with pytest.raises(NotAStoreError, match=r"index/ but no store\.sqlite.*backup"):
        MemoryStore.open(path, dim=DIM)
    assert _files(path) == before


@pytest.mark.postgres
def test_url_store_with_an_emptied_database_keeps_its_index(postgres_server, tmp_path) -> None:
    """A Postgres database whose tables were dropped, next to this worker's index files of the
    old store: refused rather than initialised as a new store."""
    location = StoreLocation("postgres", postgres_server.create_database(), tmp_path / "index")
    with location.open() as store:
        store.add([make_document("a", 2)], namespace=NS)
    with location.open() as store, store.engine.begin() as connection:
        for table in ("icmem_embeddings", "icmem_slots", "icmem_spans", "icmem_metadata_values"):
            connection.exec_driver_sql(f"DROP TABLE {table}")
        connection.exec_driver_sql("DROP TABLE icmem_documents")
        for table in ("icmem_namespace_prefixes", "icmem_namespaces", "icmem_settings"):
            connection.exec_driver_sql(f"DROP TABLE {table}")
        connection.exec_driver_sql("DROP TABLE icmem_schema_version")
    with pytest.raises(NotAStoreError, match="index files"):
        location.open()


CREATE_RACE = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[3])
    from store_testing import DIM, make_document
    from icmem.store import MemoryStore
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    with MemoryStore.open(sys.argv[1], dim=DIM) as store:
        store.add([make_document(None, 1)], namespace=("t", "a", "th"))
    """
)


def test_processes_racing_to_create_one_store_all_succeed(tmp_path: Path) -> None:
    import time

    path, start = tmp_path / "new-store", time.time() + 3.0
    tests_dir = str(Path(__file__).parent)
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", CREATE_RACE, str(path), str(start), tests_dir],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for racer in racers:
        _, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err
    with MemoryStore.open(path, dim=DIM) as store:
        assert store.stats().documents == 4
        assert len(store.search(embedding(0), 10, namespace=NS)) == 4
    assert sorted(p.name for p in path.iterdir()) == ["index", "store.sqlite"]


def _flip_payload_bit(blob: bytes) -> bytes:
    damaged = bytearray(blob)
    damaged[-5] ^= 0x04  # inside the payload: the header still parses
    return bytes(damaged)


def test_slot_blob_with_a_flipped_payload_bit_is_refused_at_write(store: MemoryStore) -> None:
    store.add([make_document("kept", 1)], namespace=NS)
    good = make_document("bad", 2, seed=5)
    span = good.spans[1]
    fields = {f: getattr(span, f) for f in span.__dataclass_fields__}
    bad_span = SpanRecord(**{**fields, "slots": _flip_payload_bit(span.slots)})
    bad = DocumentRecord(id="bad", spans=[good.spans[0], bad_span])
    for write in (store.add, store.upsert):
        with pytest.raises(InvalidRecordError, match="checksum"):
            write([make_document("other", 1, seed=9), bad], namespace=NS)
    assert [d.id for d in store.list_documents(NS)] == ["kept"]


def test_damaged_stored_slots_are_skipped_not_fatal(location: StoreLocation) -> None:
    with location.open() as store:
        added = store.add([make_document(f"d{i}", 2, seed=i) for i in range(3)], namespace=NS)
        wanted = [added[0].span_ids[0], added[1].span_ids[1], added[2].span_ids[0]]
        damaged = wanted[1]
        with store.engine.begin() as connection:
            blob = connection.scalar(select(SlotRow.blob).where(SlotRow.span_id == damaged))
            connection.execute(
                update(SlotRow)
                .where(SlotRow.span_id == damaged)
                .values(blob=_flip_payload_bit(bytes(blob)))
            )
        with pytest.warns(StoreDamageWarning, match=rf"slots of span ids \[{damaged}\]"):
            slots = store.get_slots(wanted, namespace=NS)
        assert [s.span_id for s in slots] == [wanted[0], wanted[2]]
        for s in slots:
            decode_slots(s.blob, expected_fingerprint=FINGERPRINT)  # what is returned is whole
        assert store.check().damaged_slots == (damaged,)
        assert store.check(("t", "a")).damaged_slots == (damaged,)
        assert store.check(("other",)).ok


def test_index_of_a_newer_database_is_rebuilt_after_a_restore(tmp_path: Path) -> None:
    """Back up store.sqlite, write more and save the index, restore the file but keep index/,
    write again: the new spans reuse the lost spans' ids and the namespace's generation repeats,
    so only an index tied to its exact database notices that it describes other documents."""
    path = tmp_path / "store"
    with MemoryStore.open(path, dim=DIM) as store:
        store.add([make_document(f"a{i}", 2, seed=i) for i in range(3)], namespace=NS)
    backup = (path / "store.sqlite").read_bytes()
    with MemoryStore.open(path, dim=DIM) as store:
        lost = store.add([make_document("lost", 2, seed=10)], namespace=NS)
        store.search(embedding(0), 1, namespace=NS)  # the index now holds "lost"; saved on close
    (path / "store.sqlite").write_bytes(backup)  # the restore; index/ stays as it was
    with MemoryStore.open(path, dim=DIM, read_only=True) as reader:
        assert reader.search(embedding(1000), 1, namespace=NS)[0].document_id != "lost"
        assert reader.index_repairs == 1  # rebuilt from the restored rows, not trusted
    with MemoryStore.open(path, dim=DIM) as writer:
        kept = writer.add([make_document("new", 2, seed=20)], namespace=NS)
        assert kept[0].span_ids == lost[0].span_ids  # ids repeat: the trap
        assert writer.index_repairs == 1  # the writer rebuilt the index it keeps current
    with MemoryStore.open(path, dim=DIM, read_only=True) as reader:
        hit = reader.search(embedding(2000), 1, namespace=NS)[0]
        assert (hit.document_id, hit.position) == ("new", 0)
        assert hit.score == pytest.approx(1.0, abs=1e-5)
        assert reader.search(embedding(1000), 1, namespace=NS)[0].score < 0.99
        assert reader.index_ids(NS).tolist() == reader.span_ids(NS).tolist()
        assert reader.index_repairs == 0  # the writer saved the rebuilt index


def test_stale_index_still_catches_up_incrementally(location: StoreLocation) -> None:
    """Tying the index to its database must not turn every behind-by-a-few-writes index into a
    full rebuild: another process's writes are caught up by comparing ids."""
    with location.open() as store:
        store.add([make_document(f"d{i}", 2, seed=i) for i in range(3)], namespace=NS)
    reader = location.open(read_only=True)
    reader.search(embedding(0), 1, namespace=NS)  # loads the saved index
    with location.open() as writer:
        writer.add([make_document("late", 2, seed=9)], namespace=NS)
    hit = reader.search(embedding(900), 1, namespace=NS)[0]
    assert hit.document_id == "late"
    shard = reader._index.shards[1]
    assert shard.ntotal == 8
    reader.close()


# The start of a reader that runs as `nobody`: root ignores permission bits. Every code path is
# first run as root on a copy (`warm`), because `nobody` cannot read the interpreter's files
# under /root.
AS_NOBODY = textwrap.dedent(
    """
    import json, os, pwd, sys
    import numpy as np
    from icmem.store import MemoryStore, StoreError
    path, warm, dim = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ns = ("t", "a", "th")
    with MemoryStore.open(warm, dim=dim, read_only=True) as store:
        store.search(np.ones(dim, np.float32), 3, namespace=ns)
        store.stats()
    nobody = pwd.getpwnam("nobody")
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    """
)

READ_ONLY_WAL_PROBE = AS_NOBODY + textwrap.dedent(
    """
    try:
        with MemoryStore.open(path, dim=dim, read_only=True) as store:
            hits = store.search(np.ones(dim, np.float32), 100, namespace=ns)
            result = {"documents": store.stats().documents, "hits": len(hits)}
    except StoreError as exc:
        result = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(result))
    """
)

KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    from store_testing import DIM, make_document
    from icmem.store import MemoryStore
    store = MemoryStore.open(sys.argv[1], dim=DIM)
    late = [make_document(f"late{i}", 1, seed=50 + i) for i in range(5)]
    store.add(late, namespace=("t", "a", "th"))
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print("written", flush=True)
    sys.stdin.readline()  # a live writer: holds the store open until told to stop
    store.close()
    """
)


@pytest.fixture
def shared_store(tmp_path: Path):
    """A store in a directory that `nobody` can read but not write, with 10 documents written by
    a closed store (so they are in store.sqlite itself) and a warm copy for the probe."""
    import os
    import shutil
    import tempfile

    if os.geteuid() != 0:
        pytest.fail("this test runs as root and drops to `nobody` to make the store read-only")
    base = Path(tempfile.mkdtemp(prefix="icmem-ro-wal-"))
    os.chmod(base, 0o755)
    path = base / "store"
    with MemoryStore.open(path, dim=DIM) as store:
        store.add([make_document(f"d{i}", 1, seed=i) for i in range(10)], namespace=NS)
    shutil.copytree(path, tmp_path / "warm")
    yield path, tmp_path / "warm"
    shutil.rmtree(base, ignore_errors=True)


def _probe(path: Path, warm: Path) -> dict:
    import json

    result = subprocess.run(
        [sys.executable, "-c", READ_ONLY_WAL_PROBE, str(path), str(warm), str(DIM)],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _writer(path: Path, mode: str) -> subprocess.Popen:
    tests_dir = str(Path(__file__).parent)
    return subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path), tests_dir, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_read_only_open_sees_writes_still_in_the_wal(shared_store) -> None:
    path, warm = shared_store
    writer = _writer(path, "kill")
    writer.communicate(timeout=120)
    assert writer.returncode == -9
    assert (path / "store.sqlite-wal").stat().st_size > 0  # the 5 late documents live there
    assert _probe(path, warm) == {"documents": 15, "hits": 15}


def test_read_only_reader_next_to_a_live_writer(shared_store) -> None:
    path, warm = shared_store
    writer = _writer(path, "live")
    try:
        assert writer.stdout.readline().strip() == "written"
        assert _probe(path, warm) == {"documents": 15, "hits": 15}
    finally:
        writer.communicate("stop\\n", timeout=120)
    assert writer.returncode == 0


def test_read_only_open_refuses_a_wal_it_cannot_read(shared_store) -> None:
    path, warm = shared_store
    writer = _writer(path, "kill")
    writer.communicate(timeout=120)
    (path / "store.sqlite-shm").unlink()  # lost: a copy that left it out
    answer = _probe(path, warm)
    assert answer["error"] == "ReadOnlyStoreError"
    assert "store.sqlite-shm" in answer["message"] and "write access" in answer["message"]


def test_a_process_that_only_writes_leaves_a_current_index(location: StoreLocation) -> None:
    with location.open() as store:
        store.add([make_document(f"d{i}", 2, seed=i) for i in range(3)], namespace=NS)
    with location.open() as writer:  # writes, never searches
        writer.add([make_document("w1", 2, seed=7)], namespace=NS)
        writer.upsert([make_document("d0", 1, seed=8)], namespace=NS)
        writer.delete(namespace=NS, document_ids=["d1"])
    with location.open(read_only=True) as reader:
        assert reader.search(embedding(700), 1, namespace=NS)[0].document_id == "w1"
        assert reader.index_ids(NS).tolist() == reader.span_ids(NS).tolist()
        assert reader.index_repairs == 0  # nothing to catch up: the writer saved it current


def test_a_long_running_writer_saves_its_index_as_it_goes(location: StoreLocation) -> None:
    with location.open() as store:
        store.add([make_document("d0", 2)], namespace=NS)
    writer = location.open()
    try:
        writer.index_save_interval_s = 0.0  # every write is "long enough" since the last save
        writer.add([make_document("w1", 2, seed=7)], namespace=NS)
        with location.open(read_only=True) as reader:  # the writer is still open
            assert reader.search(embedding(700), 1, namespace=NS)[0].document_id == "w1"
            assert reader.index_repairs == 0
    finally:
        writer.close()


FOLLOWING_READER = AS_NOBODY + textwrap.dedent(
    """
    with MemoryStore.open(path, dim=dim, read_only=True) as store:
        before = store.stats().documents
        print("opened", flush=True)
        sys.stdin.readline()  # a writer starts and commits meanwhile
        after = store.stats().documents
        hits = len(store.search(np.ones(dim, np.float32), 100, namespace=ns))
    print(json.dumps({"before": before, "after": after, "hits": hits}), flush=True)
    """
)


def test_read_only_reader_follows_a_writer_that_starts_later(shared_store) -> None:
    """Opened when the WAL was empty (so without the WAL's shared memory), the reader must not
    go on reading the bare database file once a writer appears."""
    import json

    path, warm = shared_store
    reader = subprocess.Popen(
        [sys.executable, "-c", FOLLOWING_READER, str(path), str(warm), str(DIM)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    writer = None
    try:
        assert reader.stdout.readline().strip() == "opened", reader.stderr.read()
        writer = _writer(path, "live")
        assert writer.stdout.readline().strip() == "written"
        out, err = reader.communicate("go\\n", timeout=120)
        assert reader.returncode == 0, err
        assert json.loads(out) == {"before": 10, "after": 15, "hits": 15}
    finally:
        if writer is not None:
            writer.communicate("stop\\n", timeout=120)
        if reader.poll() is None:
            reader.kill()


STEPPING_READER = AS_NOBODY + textwrap.dedent(
    """
    store = MemoryStore.open(path, dim=dim, read_only=True)
    for _line in sys.stdin:  # one answer per line: the parent changes the store in between
        try:
            hits = store.search(np.ones(dim, np.float32), 100, namespace=ns)
            answer = {"documents": store.stats().documents, "hits": len(hits)}
        except StoreError as exc:
            answer = {"error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(answer), flush=True)
    store.close()
    """
)


def test_read_only_reader_sees_every_commit_whatever_the_writer_did(shared_store) -> None:
    """A reader in a directory it cannot write (opened with the WAL empty, so ``immutable=1``)
    must see each commit made before its call: after a writer that added and closed (leaving no
    WAL), after a ``wal_checkpoint(TRUNCATE)`` (an empty WAL beside a live writer), and after a
    VACUUM rewrote every page of the file, which a stale reader reads as damage."""
    import json
    import sqlite3

    path, warm = shared_store
    reader = subprocess.Popen(
        [sys.executable, "-c", STEPPING_READER, str(path), str(warm), str(DIM)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )

    def ask() -> dict:
        assert reader.stdin is not None and reader.stdout is not None
        reader.stdin.write("go\n")
        reader.stdin.flush()
        line = reader.stdout.readline()
        assert line, reader.stderr.read() if reader.stderr else ""
        return json.loads(line)

    try:
        assert ask() == {"documents": 10, "hits": 10}
        with MemoryStore.open(path, dim=DIM) as writer:  # adds, then closes: no WAL is left
            writer.add([make_document(f"a{i}", 1, seed=20 + i) for i in range(5)], namespace=NS)
        assert not (path / "store.sqlite-wal").exists()
        assert ask() == {"documents": 15, "hits": 15}

        writer = MemoryStore.open(path, dim=DIM)
        try:
            writer.add([make_document(f"b{i}", 1, seed=40 + i) for i in range(5)], namespace=NS)
            assert (path / "store.sqlite-wal").stat().st_size > 0  # read through the -shm now
            assert ask() == {"documents": 20, "hits": 20}
            with writer.engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").all()
            assert (path / "store.sqlite-wal").stat().st_size == 0
            assert ask() == {"documents": 20, "hits": 20}
        finally:
            writer.close()

        with MemoryStore.open(path, dim=DIM) as writer:
            writer.delete(namespace=NS, document_ids=[f"d{i}" for i in range(8)])
        vacuum = sqlite3.connect(path / "store.sqlite")
        vacuum.execute("VACUUM")
        vacuum.close()
        assert ask() == {"documents": 12, "hits": 12}
    finally:
        if reader.stdin is not None:
            reader.stdin.close()
        reader.wait(timeout=120)
    assert reader.returncode == 0, reader.stderr.read() if reader.stderr else ""


def test_read_only_reader_in_a_writable_directory_sees_every_commit(tmp_path: Path) -> None:
    """The same sequence for a read-only store whose directory is writable (``mode=ro`` with
    the WAL's shared memory): each answer reflects every commit before it."""
    import sqlite3

    path = tmp_path / "store"
    with MemoryStore.open(path, dim=DIM) as store:
        store.add([make_document(f"d{i}", 1, seed=i) for i in range(10)], namespace=NS)
    reader = MemoryStore.open(path, dim=DIM, read_only=True)

    def seen() -> tuple[int, int]:
        hits = reader.search(np.ones(DIM, np.float32), 100, namespace=NS)
        return reader.stats().documents, len(hits)

    try:
        assert seen() == (10, 10)
        with MemoryStore.open(path, dim=DIM) as writer:
            writer.add([make_document(f"a{i}", 1, seed=20 + i) for i in range(5)], namespace=NS)
        assert seen() == (15, 15)
        with MemoryStore.open(path, dim=DIM) as writer:
            writer.add([make_document(f"b{i}", 1, seed=40 + i) for i in range(5)], namespace=NS)
            with writer.engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").all()
            assert seen() == (20, 20)
            writer.delete(namespace=NS, document_ids=[f"d{i}" for i in range(8)])
        vacuum = sqlite3.connect(path / "store.sqlite")
        vacuum.execute("VACUUM")
        vacuum.close()
        assert seen() == (12, 12)
    finally:
        reader.close()
