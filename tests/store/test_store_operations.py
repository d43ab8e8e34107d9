"""What the store does, checked against SQLite and a real PostgreSQL server alike."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from icmem.store import (
    DuplicateDocumentError,
    InvalidFilterError,
    MemoryStore,
    UnknownSpanError,
)
from store_testing import DIM, FINGERPRINT, embedding, make_document, make_slots

from icmem.codec import decode_slots

NS = ("acme", "support-bot", "thread-1")


def test_add_search_get_slots_round_trip(store: MemoryStore) -> None:
    added = store.add([make_document(f"doc{i}", 3, seed=i) for i in range(5)], namespace=NS)
    assert [a.id for a in added] == [f"doc{i}" for i in range(5)]
    assert all(len(a.span_ids) == 3 for a in added)
    # The embedding of doc3's span 1 is its own best match, with score 1 (unit vectors).
    target = added[3].span_ids[1]
    hits = store.search(embedding(301), 4, namespace=NS)
    assert hits[0].span_id == target
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert (hits[0].document_id, hits[0].position, hits[0].text) == (
        "doc3",
        1,
        "doc3 span 1 seed 3",
    )
    assert (hits[0].char_start, hits[0].char_end, hits[0].source) == (100, 199, "file://doc3")
    assert hits[0].namespace == NS
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    slots = store.get_slots([target, added[0].span_ids[0]])
    assert [s.span_id for s in slots] == [target, added[0].span_ids[0]]
    values, header = decode_slots(slots[0].blob, expected_fingerprint=FINGERPRINT)
    expected, _ = decode_slots(make_slots(301))
    np.testing.assert_array_equal(values, expected)
    assert (slots[0].codec, slots[0].shape, header.shape) == ("bf16", (4, 8), (4, 8))


def test_search_matches_brute_force(store: MemoryStore) -> None:
    store.add([make_document(f"d{i}", 4, seed=i) for i in range(20)], namespace=NS)
    # Span ids are assigned in insertion order, so they line up with the seeds' order.
    ids = store.span_ids(NS)
    matrix = np.stack([embedding(i * 100 + p) for i in range(20) for p in range(4)])
    query = np.random.default_rng(5).standard_normal(DIM).astype(np.float32)
    expected = ids[np.argsort(-(matrix @ query), kind="stable")[:7]]
    assert [h.span_id for h in store.search(query, 7, namespace=NS)] == expected.tolist()


def test_k_larger_than_namespace_returns_everything(store: MemoryStore) -> None:
    store.add([make_document("only", 3)], namespace=NS)
    assert len(store.search(embedding(0), 50, namespace=NS)) == 3
    assert store.search(embedding(0), 5, namespace=("nobody", "x", "y")) == []


def test_add_refuses_existing_id_and_upsert_replaces(store: MemoryStore) -> None:
    first = store.add([make_document("doc", 3, seed=1, metadata={"v": 1})], namespace=NS)
    with pytest.raises(DuplicateDocumentError, match="upsert"):
        store.add([make_document("doc", 2, seed=2)], namespace=NS)
    second = store.upsert([make_document("doc", 2, seed=2, metadata={"v": 2})], namespace=NS)
    assert set(first[0].span_ids).isdisjoint(second[0].span_ids)
    np.testing.assert_array_equal(store.span_ids(NS), sorted(second[0].span_ids))
    np.testing.assert_array_equal(store.index_ids(NS), sorted(second[0].span_ids))
    hit = store.search(embedding(200), 1, namespace=NS)[0]
    assert (hit.span_id, hit.metadata) == (second[0].span_ids[0], {"v": 2})
    with pytest.raises(UnknownSpanError, match="deleted"):
        store.get_slots([first[0].span_ids[0]])
    assert store.stats().documents == 1


def test_generated_ids_are_unique(store: MemoryStore) -> None:
    added = store.add([make_document(None, 1, seed=i) for i in range(3)], namespace=NS)
    assert len({a.id for a in added}) == 3


def test_delete_by_document_and_by_namespace_prefix(store: MemoryStore) -> None:
    store.add([make_document(f"d{i}", 2, seed=i) for i in range(4)], namespace=NS)
    other = ("acme", "support-bot", "thread-2")
    store.add([make_document("x", 2, seed=9)], namespace=other)
    store.add([make_document("y", 2, seed=8)], namespace=("globex", "a", "t"))
    assert store.delete(namespace=NS, document_ids=["d1", "d3", "missing"]) == 2
    assert {h.document_id for h in store.search(embedding(0), 10, namespace=NS)} == {"d0", "d2"}
    np.testing.assert_array_equal(store.index_ids(NS), store.span_ids(NS))
    assert store.delete(namespace=("acme",)) == 3
    assert store.list_namespaces() == [("globex", "a", "t")]
    assert store.search(embedding(0), 10, namespace=("acme",)) == []
    assert store.stats().spans == 2


def test_tenants_are_isolated_also_under_filters(store: MemoryStore) -> None:
    # Both tenants hold a document with the same id and metadata; the other tenant's spans are
    # nearer to the query, and still never come back.
    store.add([make_document("readme", 2, seed=1, metadata={"lang": "en"})], namespace=NS)
    intruder = ("evil", "support-bot", "thread-1")
    store.add(
        [make_document("readme", 2, seed=2, metadata={"lang": "en"})],
        namespace=intruder,
    )
    query = embedding(200)
    for filter_ in (None, {"lang": "en"}, {"$or": [{"lang": "en"}, {"lang": {"$ne": "en"}}]}):
        hits = store.search(query, 10, namespace=NS, filter=filter_)
        assert hits and all(h.namespace == NS for h in hits)
        assert {h.text for h in hits} == {"readme span 0 seed 1", "readme span 1 seed 1"}
    intruder_span = store.search(query, 1, namespace=intruder)[0].span_id
    with pytest.raises(UnknownSpanError):
        store.get_slots([intruder_span], namespace=NS)
    assert store.delete(namespace=NS, document_ids=["readme"]) == 1
    assert store.stats(intruder).documents == 1  # same id, other tenant: untouched


def test_prefix_search_spans_threads_of_one_agent(store: MemoryStore) -> None:
    store.add([make_document("a", 1, seed=1)], namespace=("t", "agent", "th1"))
    store.add([make_document("b", 1, seed=2)], namespace=("t", "agent", "th2"))
    store.add([make_document("c", 1, seed=3)], namespace=("t", "other", "th1"))
    hits = store.search(embedding(100), 10, namespace=("t", "agent"))
    assert hits[0].document_id == "a"
    assert {h.document_id for h in hits} == {"a", "b"}
    assert store.list_namespaces(("t",)) == [
        ("t", "agent", "th1"),
        ("t", "agent", "th2"),
        ("t", "other", "th1"),
    ]


FILTER_DOCS = {
    "a": {"lang": "en", "year": 2020, "draft": False, "tag": "x"},
    "b": {"lang": "de", "year": 2023, "draft": True},
    "c": {"lang": "en", "year": 2024.5, "tag": "y"},
    "d": {"lang": "fr", "year": "2023"},  # a string, not a number
    "e": {"lang": "1", "count": 1},
}


@pytest.mark.parametrize(
    ("filter_", "expected"),
    [
        ({"lang": "en"}, {"a", "c"}),
        ({"lang": "en", "tag": "y"}, {"c"}),
        ({"year": 2023}, {"b"}),  # type-strict: "2023" (d) is a string
        ({"year": "2023"}, {"d"}),
        ({"year": {"$gte": 2023}}, {"b", "c"}),
        ({"year": {"$gt": 2020, "$lt": 2024}}, {"b"}),
        ({"year": {"$lte": 2020}}, {"a"}),
        ({"draft": True}, {"b"}),
        ({"draft": False}, {"a"}),
        ({"count": True}, set()),  # 1 is not true
        ({"lang": 1}, set()),  # "1" is not 1
        ({"draft": {"$ne": True}}, {"a", "c", "d", "e"}),  # includes documents without the key
        ({"lang": {"$in": ["de", "fr"]}}, {"b", "d"}),
        ({"lang": {"$nin": ["de", "fr"]}}, {"a", "c", "e"}),
        ({"tag": {"$exists": True}}, {"a", "c"}),
        ({"tag": {"$exists": False}}, {"b", "d", "e"}),
        ({"$or": [{"lang": "de"}, {"tag": "y"}]}, {"b", "c"}),
        ({"$and": [{"lang": "en"}, {"year": {"$gt": 2021}}]}, {"c"}),
        ({"lang": "en' OR '1'='1"}, set()),
        ({"lang') OR 1=1 --": "en"}, set()),
    ],
)
def test_metadata_filters(store: MemoryStore, filter_: dict, expected: set[str]) -> None:
    store.add(
        [make_document(k, 1, seed=i, metadata=m) for i, (k, m) in enumerate(FILTER_DOCS.items())],
        namespace=NS,
    )
    hits = store.search(embedding(0), 10, namespace=NS, filter=filter_)
    assert {h.document_id for h in hits} == expected
    assert store.stats().documents == len(FILTER_DOCS)  # no injected statement ran


@pytest.mark.parametrize(
    ("filter_", "message"),
    [
        ({"year": {"$regex": "20.*"}}, "unknown operator"),
        ({"$nor": [{"a": 1}]}, "unknown filter operator"),
        ({"year": {"$gt": "2020"}}, "numbers only"),
        ({"tags": ["a", "b"]}, "string, number or boolean"),
        ({"a": {"$in": []}}, "non-empty list"),
        ({'a"b': 1}, "quotes"),
        ({"$or": "lang"}, "non-empty list"),
    ],
)
def test_bad_filters_are_refused(store: MemoryStore, filter_: dict, message: str) -> None:
    store.add([make_document("a", 1)], namespace=NS)
    with pytest.raises(InvalidFilterError, match=message):
        store.search(embedding(0), 3, namespace=NS, filter=filter_)


def test_reopened_store_answers_the_same(location, store: MemoryStore) -> None:
    store.add([make_document(f"d{i}", 3, seed=i) for i in range(10)], namespace=NS)
    store.delete(namespace=NS, document_ids=["d4"])
    queries = [embedding(5000 + i) for i in range(5)]
    before = [store.search(q, 5, namespace=NS) for q in queries]
    store.close()
    with location.open() as reopened:
        assert [reopened.search(q, 5, namespace=NS) for q in queries] == before
        assert reopened.index_repairs == 0  # the saved index was current and was reused


def test_stats_counts_and_sizes(store: MemoryStore) -> None:
    store.add([make_document(f"d{i}", 3, seed=i) for i in range(4)], namespace=NS)
    store.add([make_document("z", 1)], namespace=("o", "a", "t"))
    stats = store.stats()
    assert (stats.namespaces, stats.documents, stats.spans) == (2, 5, 13)
    assert stats.slot_bytes == 13 * len(make_slots(0))
    assert stats.embedding_bytes == 13 * DIM * 4
    assert stats.database_bytes > stats.slot_bytes
    scoped = store.stats(NS)
    assert (scoped.namespaces, scoped.documents, scoped.spans) == (1, 4, 12)
    store.save_index()
    assert store.stats().index_bytes > 0


def test_async_variants(store: MemoryStore) -> None:
    async def scenario() -> tuple:
        added = await store.aadd([make_document("a", 2, seed=1)], namespace=NS)
        await store.aupsert([make_document("b", 2, seed=2)], namespace=NS)
        hits = await store.asearch(embedding(100), 1, namespace=NS)
        slots = await store.aget_slots([hits[0].span_id])
        namespaces = await store.alist_namespaces()
        stats = await store.astats()
        deleted = await store.adelete(namespace=NS, document_ids=["b"])
        return added, hits, slots, namespaces, stats, deleted

    added, hits, slots, namespaces, stats, deleted = asyncio.run(scenario())
    assert hits[0].span_id == added[0].span_ids[0] == slots[0].span_id
    assert (namespaces, stats.documents, deleted) == ([NS], 2, 1)


def test_list_documents_in_insertion_order(store: MemoryStore) -> None:
    store.add([make_document("b", 2, metadata={"n": 1}), make_document("a", 3)], namespace=NS)
    store.add([make_document("c", 1)], namespace=("acme", "other", "t"))
    store.upsert([make_document("b", 1, seed=5)], namespace=NS)
    documents = store.list_documents(NS)
    assert [(d.id, d.span_count, d.namespace) for d in documents] == [("b", 1, NS), ("a", 3, NS)]
    assert (documents[0].source, documents[0].content_hash) == ("file://b", "hash-b-5")
    assert documents[0].metadata == {}
    assert [d.id for d in store.list_documents(("acme",))] == ["b", "a", "c"]
    assert store.list_documents(("nobody",)) == []


def test_concurrent_async_calls_from_one_process(store: MemoryStore) -> None:
    store.add([make_document("seed", 2)], namespace=NS)

    async def scenario() -> list:
        writes = [store.aadd([make_document(f"w{i}", 3, seed=i)], namespace=NS) for i in range(6)]
        reads = [store.asearch(embedding(i), 3, namespace=NS) for i in range(20)]
        return await asyncio.gather(*writes, *reads)

    results = asyncio.run(scenario())
    assert all(len(hits) >= 2 and all(h.namespace == NS for h in hits) for hits in results[6:])
    assert store.stats(NS).spans == 2 + 6 * 3
    np.testing.assert_array_equal(store.index_ids(NS), store.span_ids(NS))


@pytest.mark.parametrize("size", [993, 5_000, 40_000])
def test_large_in_and_nin_lists(store: MemoryStore, size: int) -> None:
    store.add(
        [make_document(k, 1, seed=i, metadata=m) for i, (k, m) in enumerate(FILTER_DOCS.items())],
        namespace=NS,
    )
    # Many values of every JSON type, none of which matches by accident: 2023 the number matches
    # b only, "de" matches b, 1 the number matches e's count but not its lang "1".
    filler = [f"v{i}" for i in range(size // 2)] + list(range(10_000, 10_000 + size // 2))
    cases = [
        ({"lang": {"$in": [*filler, "de", "fr"]}}, {"b", "d"}),
        ({"year": {"$in": [*filler, 2023, True]}}, {"b"}),
        ({"year": {"$in": [*filler, 2024.5, "2023"]}}, {"c", "d"}),
        ({"lang": {"$in": [*filler, 1]}}, set()),
        ({"draft": {"$in": [*filler, True]}}, {"b"}),
        ({"count": {"$in": [*filler, 1.0]}}, {"e"}),
        ({"lang": {"$nin": [*filler, "de", "fr"]}}, {"a", "c", "e"}),
    ]
    for filter_, expected in cases:
        hits = store.search(embedding(0), 10, namespace=NS, filter=filter_)
        assert {h.document_id for h in hits} == expected, filter_


def test_equality_never_matches_inside_arrays(store: MemoryStore) -> None:
    # Postgres' containment would let {"tags": "a"} match ["a", "b"]; SQLite's json_extract would
    # not. Both backends must agree: equality compares whole values.
    store.add([make_document("t", 1, metadata={"tags": ["a", "b"], "n": [1]})], namespace=NS)
    store.add([make_document("u", 1, seed=1, metadata={"tags": "a", "n": 1})], namespace=NS)
    for filter_ in ({"tags": "a"}, {"tags": {"$in": ["a"]}}, {"n": 1}, {"n": {"$in": [1]}}):
        hits = store.search(embedding(0), 10, namespace=NS, filter=filter_)
        assert {h.document_id for h in hits} == {"u"}, filter_


def test_filtered_answers_follow_every_change(store: MemoryStore) -> None:
    """Filter answers are reused until the namespace changes: each write must be seen."""
    store.add(
        [make_document("a", 2, metadata={"v": 1}), make_document("b", 1, seed=1)], namespace=NS
    )

    def found(filter_: dict) -> set[str]:
        return {h.document_id for h in store.search(embedding(0), 10, namespace=NS, filter=filter_)}

    assert found({"v": 1}) == {"a"}
    store.upsert([make_document("a", 2, seed=2, metadata={"v": 2})], namespace=NS)
    assert (found({"v": 1}), found({"v": 2})) == (set(), {"a"})
    store.add([make_document("c", 1, seed=3, metadata={"v": 2})], namespace=NS)
    assert found({"v": 2}) == {"a", "c"}
    store.delete(namespace=NS, document_ids=["a"])
    assert found({"v": 2}) == {"c"}
    assert found({"v": {"$exists": False}}) == {"b"}
