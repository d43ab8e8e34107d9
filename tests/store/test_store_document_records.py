"""Reading documents by id and replacing their metadata alone (what LangGraph items need),
checked against SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from icmem.store import InvalidRecordError, MemoryStore
from store_testing import embedding, make_document

NS = ("acme", "bot", "t1")


def test_get_documents_by_id_in_the_order_asked(store: MemoryStore) -> None:
    store.add(
        [make_document(f"d{i}", 1, seed=i, metadata={"i": i}) for i in range(3)], namespace=NS
    )
    store.add([make_document("d0", 1, seed=9)], namespace=(*NS, "below"))
    found = store.get_documents(["d2", "missing", "d0"], namespace=NS)
    assert [(d.id, d.metadata, d.namespace, d.span_count) for d in found] == [
        ("d2", {"i": 2}, NS, 1),
        ("d0", {"i": 0}, NS, 1),
    ]
    assert store.get_documents(["d0"], namespace=("acme", "bot")) == []  # exact namespace only
    assert store.get_documents([], namespace=NS) == []
    assert asyncio.run(store.aget_documents(["d1"], namespace=NS))[0].id == "d1"
    with pytest.raises(InvalidRecordError, match="not one string"):
        store.get_documents("d0", namespace=NS)


def test_update_metadata_keeps_spans_and_moves_filters_on(store: MemoryStore) -> None:
    store.add(
        [make_document(f"d{i}", 2, seed=i, metadata={"tag": "a"}) for i in range(2)], namespace=NS
    )
    spans = store.span_ids(NS).tolist()
    query = embedding(100)  # d1's first span
    assert [h.document_id for h in store.search(query, 4, namespace=NS, filter={"tag": "b"})] == []
    assert store.update_metadata({"d1": {"tag": "b"}, "nope": {"tag": "b"}}, namespace=NS) == 1
    assert store.span_ids(NS).tolist() == spans
    assert np.array_equal(store.index_ids(NS), np.asarray(spans))
    hits = store.search(query, 4, namespace=NS, filter={"tag": "b"})  # no stale filter answer
    assert {h.document_id for h in hits} == {"d1"} and hits[0].metadata == {"tag": "b"}
    assert store.get_documents(["d0"], namespace=NS)[0].metadata == {"tag": "a"}
    assert asyncio.run(store.aupdate_metadata({"d0": {"tag": "c"}}, namespace=NS)) == 1
    assert store.update_metadata({"d0": {}}, namespace=("elsewhere",)) == 0


def test_update_metadata_refuses_bad_metadata_and_changes_nothing(store: MemoryStore) -> None:
    store.add([make_document("d0", 1, metadata={"tag": "a"})], namespace=NS)
    with pytest.raises(InvalidRecordError):
        store.update_metadata({"d0": {"ok": 1}, "d1": {"bad": float("nan")}}, namespace=NS)
    with pytest.raises(InvalidRecordError, match="map document ids"):
        store.update_metadata([("d0", {})], namespace=NS)
    assert store.get_documents(["d0"], namespace=NS)[0].metadata == {"tag": "a"}
