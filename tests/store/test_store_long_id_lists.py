"""Issue 22, item 6: every call that takes a list of ids takes a list of any length. One SQL
``IN`` list used to carry all of them, which Postgres refuses past 65,535 parameters and SQLite
past its build's limit (250,000 here)."""

from __future__ import annotations

import pytest
from icmem.store import MemoryStore, UnknownSpanError
from store_testing import embedding, make_document

NS = ("t", "a", "th")
MANY = 260_000  # past both databases' parameter limits


@pytest.fixture
def filled(store: MemoryStore) -> tuple[MemoryStore, list[int]]:
    added = store.add([make_document(f"d{i}", 2, seed=i) for i in range(4)], namespace=NS)
    return store, [span_id for document in added for span_id in document.span_ids]


def test_delete_takes_any_number_of_ids(filled) -> None:
    store, _ = filled
    keys = [f"absent-{i}" for i in range(MANY)] + ["d1", "d3"]
    assert store.delete(namespace=NS, document_ids=keys) == 2
    assert [d.id for d in store.list_documents(NS)] == ["d0", "d2"]
    assert store.index_ids(NS).tolist() == store.span_ids(NS).tolist()


def test_update_metadata_takes_any_number_of_ids(filled) -> None:
    store, _ = filled
    updates = {f"absent-{i}": {"n": i} for i in range(MANY)}
    updates["d2"] = {"n": -1}
    assert store.update_metadata(updates, namespace=NS) == 1
    assert store.get_documents(["d2"], namespace=NS)[0].metadata == {"n": -1}
    hits = store.search(embedding(0), 10, namespace=NS, filter={"n": -1})
    assert {h.document_id for h in hits} == {"d2"}


def test_get_slots_and_get_spans_take_any_number_of_ids(filled) -> None:
    store, span_ids = filled
    repeated = span_ids * (MANY // len(span_ids))  # every id, asked for many times over
    slots = store.get_slots(repeated, namespace=NS)
    assert [s.span_id for s in slots] == repeated
    spans = store.get_spans(repeated, namespace=NS)
    assert [s.span_id for s in spans] == repeated
    absent = list(range(10**9, 10**9 + MANY))
    with pytest.raises(UnknownSpanError, match="no memory slots"):
        store.get_slots([*span_ids, *absent], namespace=NS)
    with pytest.raises(UnknownSpanError, match="no spans"):
        store.get_spans([*span_ids, *absent], namespace=NS)


def test_get_documents_takes_any_number_of_ids(filled) -> None:
    store, _ = filled
    keys = [f"absent-{i}" for i in range(MANY)] + ["d3", "d0"]
    assert [d.id for d in store.get_documents(keys, namespace=NS)] == ["d3", "d0"]
