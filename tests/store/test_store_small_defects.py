"""Issue 22, item 8: inputs that used to be silently reinterpreted (a dict taken as its keys, a
(4, 4) array flattened to one dim-16 vector) are refused, and namespaces that schema 1 stored
with labels no call can give any more are renamed on migration so that they stay reachable."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from icmem.store import InvalidRecordError, MemoryStore
from icmem.store.namespaces import addressable_label, validate_namespace
from store_testing import DIM, make_document

NS = ("t", "a", "th")
V1_STORE = Path(__file__).with_name("fixtures") / "v1-store"
V1_DIM = 8


@pytest.mark.parametrize(
    "namespace", [{"t": 1, "a": 2}, {"t": "x"}, {"t", "a"}, frozenset({"t"})], ids=repr
)
def test_a_mapping_or_set_is_not_a_namespace(store: MemoryStore, namespace) -> None:
    store.add([make_document("d", 1)], namespace=("t", "a"))
    with pytest.raises(InvalidRecordError, match="tuple of 1 to 16"):
        store.add([make_document("e", 1)], namespace=namespace)
    with pytest.raises(InvalidRecordError, match="tuple of 1 to 16"):
        store.search(np.ones(DIM, np.float32), 1, namespace=namespace)
    with pytest.raises(InvalidRecordError, match="tuple of 1 to 16"):
        store.delete(namespace=namespace)
    assert store.list_documents(("t", "a"))[0].id == "d"  # nothing was deleted


def test_an_embedding_of_several_rows_is_not_flattened(store: MemoryStore) -> None:
    good = make_document("d", 1)
    square = np.ones((4, DIM // 4), np.float32)  # 16 numbers, shaped as 4 vectors
    span = good.spans[0]
    bad = type(good)(id="d", spans=[type(span)(**{**span.__dict__, "embedding": square})])
    with pytest.raises(InvalidRecordError, match=r"one vector .* shape \(4, 4\)"):
        store.add([bad], namespace=NS)
    assert store.list_namespaces() == []
    store.add([good], namespace=NS)
    with pytest.raises(InvalidRecordError, match=r"one vector .* shape \(4, 4\)"):
        store.search(square, 1, namespace=NS)
    row = good.spans[0].embedding.reshape(1, DIM)  # a single row is one vector
    assert store.search(row, 1, namespace=NS)[0].document_id == "d"


@pytest.mark.parametrize(
    ("old", "readable"),
    [("", "(empty)"), ("a\x00b", "a\\0b"), ("x" * 300, "x" * 200)],
    ids=["empty", "nul", "300-chars"],
)
def test_legacy_labels_are_renamed_on_migration_and_stay_reachable(
    tmp_path: Path, old: str, readable: str
) -> None:
    path = tmp_path / "store"
    shutil.copytree(V1_STORE, path)
    with sqlite3.connect(path / "store.sqlite") as connection:
        (ns_id,) = connection.execute(
            "SELECT id FROM icmem_namespaces WHERE tenant = 'beta'"
        ).fetchone()
        count = connection.execute(
            "SELECT count(*) FROM icmem_documents WHERE namespace_id = ?", (ns_id,)
        ).fetchone()[0]
        connection.execute("UPDATE icmem_namespaces SET agent = ? WHERE id = ?", (old, ns_id))
    assert count > 0
    with pytest.warns(UserWarning, match="renamed"):
        store = MemoryStore.open(path, dim=V1_DIM)
    with store:
        renamed = [ns for ns in store.list_namespaces() if ns[0] == "beta"]
        assert len(renamed) == 1
        label = renamed[0][1]
        assert label == addressable_label(old) and label.startswith(readable + "~")
        assert validate_namespace(renamed[0]) == renamed[0]
        assert len(store.list_documents(renamed[0], exact=True)) == count
        query = np.ones(V1_DIM, np.float32) / np.sqrt(V1_DIM)
        assert len(store.search(query, 100, namespace=renamed[0])) > 0
        assert store.delete(namespace=renamed[0]) == count  # it can be addressed, also to delete


def test_stand_ins_keep_distinct_labels_apart() -> None:
    long_a, long_b = "x" * 300, "x" * 299 + "y"
    assert addressable_label(long_a) != addressable_label(long_b)
    assert addressable_label("ok") == "ok"
