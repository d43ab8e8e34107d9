"""``list_documents(filter=..., filter_root=...)``: the listing filtered in SQL, on top-level or
nested metadata keys, gives exactly what the same filter gives a search, on both backends."""

from __future__ import annotations

import pytest
from icmem.store import InvalidFilterError, MemoryStore
from store_testing import embedding, make_document

NS = ("t", "a")
ROOT = ("item", "value")
VALUES = {
    "red": {"color": "red", "n": 1, "flag": True},
    "blue": {"color": "blue", "n": 2**53 + 1, "flag": False},
    "green": {"color": "green", "n": 2.5},
    "bare": {"n": 1},
}


@pytest.fixture
def listed(store: MemoryStore) -> MemoryStore:
    documents = [
        make_document(key, 1, seed=i, metadata={"item": {"value": value}, "top": key})
        for i, (key, value) in enumerate(VALUES.items())
    ]
    documents.append(make_document("plain", 1, seed=9, metadata={"color": "red", "n": 1}))
    store.add(documents, namespace=NS)
    store.add([make_document("elsewhere", 1, seed=10, metadata={"top": "red"})], namespace=("u",))
    return store


@pytest.mark.parametrize(
    ("filter_", "expected"),
    [
        ({"color": "red"}, ["red"]),
        ({"n": 1}, ["red", "bare"]),
        ({"n": {"$gt": 2**53}}, ["blue"]),
        ({"n": {"$lte": 2**53}}, ["red", "green", "bare"]),
        ({"flag": True}, ["red"]),
        ({"color": {"$in": ["red", "green"]}}, ["red", "green"]),
        ({"color": {"$ne": "red"}}, ["blue", "green", "bare", "plain"]),
        ({"color": {"$exists": False}}, ["bare", "plain"]),
        ({"$or": [{"color": "blue"}, {"n": 2.5}]}, ["blue", "green"]),
    ],
)
def test_nested_filters_list_what_they_match(listed: MemoryStore, filter_, expected) -> None:
    found = listed.list_documents(("t",), filter=filter_, filter_root=ROOT)
    assert [d.id for d in found] == expected  # in the order first added


def test_top_level_filters_list_like_search(listed: MemoryStore) -> None:
    found = listed.list_documents(("t",), filter={"top": {"$in": ["red", "blue"]}})
    assert [d.id for d in found] == ["red", "blue"]
    hits = listed.search(
        embedding(0), 100, namespace=("t",), filter={"top": {"$in": ["red", "blue"]}}
    )
    assert {h.document_id for h in hits} == {"red", "blue"}
    assert [d.id for d in listed.list_documents(("t",), filter={"n": 1})] == ["plain"]
    assert listed.list_documents(("t",), exact=True, filter={"top": "red"}) == []
    assert [d.id for d in listed.list_documents(NS, exact=True, filter={"top": "red"})] == ["red"]


def test_a_bad_root_is_an_invalid_filter(listed: MemoryStore) -> None:
    with pytest.raises(InvalidFilterError, match="keys"):
        listed.list_documents(NS, filter={"n": 1}, filter_root=("item", 'a"b'))


def test_list_namespaces_keeps_those_holding_a_match(listed: MemoryStore) -> None:
    listed.add([make_document("x", 1, seed=11, metadata={"top": "blue"})], namespace=("t", "b"))
    listed.add([make_document("y", 1, seed=12, metadata={"top": "red"})], namespace=("t", "b", "c"))
    assert listed.list_namespaces() == [("t", "a"), ("t", "b"), ("t", "b", "c"), ("u",)]
    assert listed.list_namespaces(filter={"top": "red"}) == [("t", "a"), ("t", "b", "c"), ("u",)]
    assert listed.list_namespaces(("t",), filter={"top": "blue"}) == [("t", "a"), ("t", "b")]
    nested = listed.list_namespaces(filter={"color": "red"}, filter_root=ROOT)
    assert nested == [("t", "a")]
    wide = {"$or": [{"top": f"none{i}"} for i in range(3_000)] + [{"top": "blue"}]}
    assert listed.list_namespaces(("t",), filter=wide) == [("t", "a"), ("t", "b")]
    assert listed.list_namespaces(filter={"top": "nothing"}) == []
