"""Issue 22, item 3: a document whose stored metadata is damaged (not JSON, or JSON that is not
an object) never blocks the rest of the store. Reads leave it out with a ``StoreDamageWarning``
that names it and the fix; ``update_metadata`` and ``upsert`` repair it; ``check()`` lists it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from icmem.store import MemoryStore, StoreDamageWarning
from sqlalchemy import text
from store_testing import DIM, StoreLocation, make_document

NS = ("t", "a", "th")
QUERY = np.ones(DIM, np.float32) / np.sqrt(DIM)
DAMAGE = {
    "sqlite": ['{"vis": "pub', "[1, 2]", '"just text"', "not json at all"],
    "postgres": ["[1, 2]", '"just text"', "5", "true"],  # jsonb holds only valid JSON
}


def _damage(store: MemoryStore, key: str, raw: str) -> None:
    """Write ``raw`` into the document's metadata column as another tool would."""
    cast = "CAST(:raw AS JSONB)" if store.dialect == "postgresql" else ":raw"
    with store.engine.begin() as connection:
        connection.execute(
            text(f"UPDATE icmem_documents SET metadata = {cast} WHERE key = :key"),
            {"raw": raw, "key": key},
        )


@pytest.fixture(params=range(4), ids=lambda i: f"damage{i}")
def damaged(request, location: StoreLocation):
    choices = DAMAGE[location.backend]
    with location.open() as store:
        store.add(
            [
                make_document("good", 2, seed=1, metadata={"vis": "public"}),
                make_document("bad", 2, seed=2, metadata={"vis": "public"}),
            ],
            namespace=NS,
        )
        _damage(store, "bad", choices[request.param])
        yield store


def _quietly(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answer = call()
    damage = [w for w in caught if issubclass(w.category, StoreDamageWarning)]
    return answer, damage


def test_reads_leave_a_damaged_document_out_with_a_warning(damaged: MemoryStore) -> None:
    store = damaged
    for call in (
        lambda: store.search(QUERY, 10, namespace=NS),
        lambda: store.search(QUERY, 10, namespace=("t",)),
    ):
        hits, damage = _quietly(call)
        assert {h.document_id for h in hits} == {"good"}
        assert all(isinstance(h.metadata, dict) for h in hits)
        assert len(damage) == 1
        message = str(damage[0].message)
        assert "'bad'" in message and "update_metadata()" in message and "upsert()" in message
    hits, damage = _quietly(lambda: store.search(QUERY, 10, namespace=NS, filter={"vis": "public"}))
    assert {h.document_id for h in hits} == {"good"}  # damaged metadata matches no filter
    documents, damage = _quietly(lambda: store.list_documents(NS))
    assert [d.id for d in documents] == ["good"] and len(damage) == 1
    documents, damage = _quietly(lambda: store.get_documents(["bad", "good"], namespace=NS))
    assert [d.id for d in documents] == ["good"] and len(damage) == 1
    bad_spans = [int(i) for i in store.span_ids(NS)][2:]
    spans, damage = _quietly(lambda: store.get_spans(bad_spans, namespace=NS))
    assert spans == [] and len(damage) == 1
    assert [s.span_id for s in store.get_slots(bad_spans, namespace=NS)] == bad_spans
    assert store.check().invalid_metadata == ((NS, "bad"),)


def test_update_metadata_repairs_a_damaged_document(damaged: MemoryStore) -> None:
    assert damaged.update_metadata({"bad": {"vis": "fixed"}}, namespace=NS) == 1
    documents, damage = _quietly(lambda: damaged.list_documents(NS))
    assert [(d.id, d.metadata) for d in documents] == [
        ("good", {"vis": "public"}),
        ("bad", {"vis": "fixed"}),
    ]
    assert damage == [] and damaged.check().invalid_metadata == ()
    hits = damaged.search(QUERY, 10, namespace=NS, filter={"vis": "fixed"})
    assert {h.document_id for h in hits} == {"bad"}


def test_upsert_repairs_a_damaged_document(damaged: MemoryStore) -> None:
    damaged.upsert([make_document("bad", 3, seed=5, metadata={"vis": "new"})], namespace=NS)
    documents, damage = _quietly(lambda: damaged.get_documents(["bad"], namespace=NS))
    assert [(d.id, d.metadata, d.span_count) for d in documents] == [("bad", {"vis": "new"}, 3)]
    assert damage == [] and damaged.check().invalid_metadata == ()
    assert damaged.index_ids(NS).tolist() == damaged.span_ids(NS).tolist()


def test_delete_removes_a_damaged_document(damaged: MemoryStore) -> None:
    assert damaged.delete(namespace=NS, document_ids=["bad"]) == 1
    documents, damage = _quietly(lambda: damaged.list_documents(NS))
    assert [d.id for d in documents] == ["good"] and damage == []
