"""A search over a prefix of many namespaces runs as one merged index: it must answer exactly
what searching every namespace would (brute force over the stored vectors, ties by span id),
filtered or not, and follow each namespace's writes, deletes and metadata changes."""

from __future__ import annotations

import numpy as np
import pytest
from icmem.store import MemoryStore
from store_testing import embedding, make_document

NAMESPACES = 20  # more than the merge threshold
PREFIX = ("tenant",)


def _expected(store: MemoryStore, query: np.ndarray, k: int, filter_=None) -> list[int]:
    """Brute force over the rows: every span under the prefix (matching the filter) scored."""
    candidates: list[tuple[float, int]] = []
    for info in store.list_documents(PREFIX, filter=filter_):
        for span_id in _spans_of[(info.namespace, info.id)]:
            candidates.append((float(np.dot(_vectors[span_id], query)), span_id))
    candidates.sort(key=lambda pair: (-pair[0], pair[1]))
    return [span_id for _, span_id in candidates[:k]]


_vectors: dict[int, np.ndarray] = {}  # span id -> the vector written
_spans_of: dict[tuple[tuple[str, ...], str], list[int]] = {}  # (namespace, key) -> span ids


def _write(store: MemoryStore, namespace, key: str, seed: int, *, upsert: bool = False) -> None:
    document = make_document(key, 3, seed=seed, metadata={"even": seed % 2 == 0})
    write = store.upsert if upsert else store.add
    (added,) = write([document], namespace=namespace)
    _spans_of[(namespace, key)] = list(added.span_ids)
    for span_id, span in zip(added.span_ids, document.spans, strict=True):
        _vectors[span_id] = np.asarray(span.embedding, np.float32)


@pytest.fixture
def many(location):
    _vectors.clear()
    _spans_of.clear()
    with location.open() as store:
        for n in range(NAMESPACES):
            for d in range(4):
                _write(store, (*PREFIX, f"user-{n}"), f"doc-{d}", seed=n * 10 + d)
        yield store


def _found(store: MemoryStore, query: np.ndarray, k: int, filter_=None) -> list[int]:
    return [hit.span_id for hit in store.search(query, k, namespace=PREFIX, filter=filter_)]


@pytest.mark.parametrize("filter_", [None, {"even": True}])
def test_prefix_search_over_many_namespaces_is_exact(many: MemoryStore, filter_) -> None:
    for q in range(5):
        query = embedding(900 + q)
        assert _found(many, query, 7, filter_) == _expected(many, query, 7, filter_)


def test_prefix_search_follows_writes_to_its_namespaces(many: MemoryStore) -> None:
    def check(seed: int) -> None:
        for q in range(5):
            query = embedding(seed + q)
            assert _found(many, query, 9) == _expected(many, query, 9)
            even = {"even": True}
            assert _found(many, query, 9, even) == _expected(many, query, 9, even)

    check(950)  # builds the merged view of the prefix's namespaces
    _write(many, (*PREFIX, "user-3"), "new", seed=7_777)
    _write(many, (*PREFIX, "user-4"), "doc-1", seed=8_888, upsert=True)
    many.delete(namespace=(*PREFIX, "user-5"), document_ids=["doc-0", "doc-2"])
    del _spans_of[((*PREFIX, "user-5"), "doc-0")], _spans_of[((*PREFIX, "user-5"), "doc-2")]
    many.update_metadata({"doc-3": {"even": True}}, namespace=(*PREFIX, "user-6"))
    # A span of the new document is found by its own vector, through the merged view.
    new_span = _spans_of[((*PREFIX, "user-3"), "new")][1]
    assert _found(many, _vectors[new_span], 1) == [new_span]
    check(960)
    many.delete(namespace=(*PREFIX, "user-7"))  # one namespace fewer under the prefix
    for key in [key for key in _spans_of if key[0] == (*PREFIX, "user-7")]:
        del _spans_of[key]
    check(970)


def test_equal_scores_across_namespaces_come_back_by_span_id(location) -> None:
    same = embedding(1)
    with location.open() as store:
        ids = []
        for n in reversed(range(NAMESPACES)):
            document = make_document("twin", 1, seed=n, vector=lambda _seed: same)
            ids.extend(store.add([document], namespace=(*PREFIX, f"user-{n}"))[0].span_ids)
        hits = store.search(same, 5, namespace=PREFIX)
        assert [h.span_id for h in hits] == sorted(ids)[:5]


def test_a_large_ivf_namespace_beside_many_small_ones(location) -> None:
    """Small shards are merged, a large (IVF) one is searched on its own; the best span of
    either kind wins the merge of the two answers."""
    from icmem.store import IndexPolicy

    _vectors.clear()
    _spans_of.clear()
    with location.open(index_policy=IndexPolicy(flat_max=1_000)) as store:
        for n in range(NAMESPACES):
            _write(store, (*PREFIX, f"user-{n}"), "doc", seed=n)
        # 1,200 spans: past flat_max, so this namespace's index is IVF.
        big = [make_document(f"big-{d}", 10, seed=5_000 + d) for d in range(120)]
        added = store.add(big, namespace=(*PREFIX, "big"))
        for document, record in zip(added, big, strict=True):
            for span_id, span in zip(document.span_ids, record.spans, strict=True):
                _vectors[span_id] = np.asarray(span.embedding, np.float32)
        small = _spans_of[((*PREFIX, "user-4"), "doc")][2]
        large = added[33].span_ids[4]
        for wanted in (small, large):
            assert _found(store, _vectors[wanted], 1) == [wanted]


def _write_many(store: MemoryStore, namespaces: int, documents: int, spans: int) -> None:
    for n in range(namespaces):
        for d in range(documents):
            seed = 1_000 + n * documents + d
            document = make_document(f"doc-{d}", spans, seed=seed, metadata={"even": d % 2 == 0})
            (added,) = store.add([document], namespace=(*PREFIX, f"user-{n}"))
            _spans_of[((*PREFIX, f"user-{n}"), f"doc-{d}")] = list(added.span_ids)
            for span_id, span in zip(added.span_ids, document.spans, strict=True):
                _vectors[span_id] = np.asarray(span.embedding, np.float32)


def test_a_merged_view_past_flat_max_is_ivf_and_matches_brute_force(location) -> None:
    """A prefix holding more spans than ``flat_max`` is searched through an IVF merged view
    (the cost of one index of that size): every span is found by its own vector, a filter
    that keeps half of the spans probes every list and is exact, an unfiltered search recalls
    most of the brute-force answer and never returns a span from outside the prefix or with
    a wrong score, and the view follows writes and deletes."""
    from icmem.store import IndexPolicy

    _vectors.clear()
    _spans_of.clear()
    with location.open(index_policy=IndexPolicy(flat_max=1_000)) as store:
        _write_many(store, NAMESPACES, 6, 10)  # 1,200 spans in 20 small (flat) shards
        store.add([make_document("elsewhere", 5, seed=99)], namespace=("other", "x"))
        store.search(embedding(0), 1, namespace=PREFIX)
        assert store._index._views[PREFIX].index.kind == "ivf"
        for span_id in list(_vectors)[::37]:
            assert _found(store, _vectors[span_id], 1) == [span_id]
        overlap = []
        for q in range(20):
            query = embedding(2_000 + q)
            even = {"even": True}
            assert _found(store, query, 10, even) == _expected(store, query, 10, even)
            hits = store.search(query, 10, namespace=PREFIX)
            assert all(hit.span_id in _vectors for hit in hits)
            scores = [float(np.dot(_vectors[hit.span_id], query)) for hit in hits]
            assert [hit.score for hit in hits] == pytest.approx(scores, abs=1e-5)
            assert scores == sorted(scores, reverse=True)
            overlap.append(len({h.span_id for h in hits} & set(_expected(store, query, 10))))
        assert np.mean(overlap) >= 7  # recall@10 of nprobe 16 of 64 lists on random vectors

        _write(store, (*PREFIX, "user-3"), "new", seed=7_777)
        gone = _spans_of.pop(((*PREFIX, "user-5"), "doc-0"))
        store.delete(namespace=(*PREFIX, "user-5"), document_ids=["doc-0"])
        new_span = _spans_of[((*PREFIX, "user-3"), "new")][1]
        assert _found(store, _vectors[new_span], 1) == [new_span]
        assert not set(_found(store, _vectors[gone[0]], 10)) & set(gone)
        query = embedding(3_000)
        assert _found(store, query, 10, {"even": True}) == _expected(store, query, 10, even)


def test_a_prefix_search_sees_namespaces_another_store_object_changed(many, location) -> None:
    """The namespace rows a prefix search reuses are checked against the database on every
    search: another store object (as another process would) that deletes one namespace and
    creates another (the count stays), or writes to one, is seen by the next search."""
    query = embedding(990)
    assert _found(many, query, 9) == _expected(many, query, 9)
    with location.open() as other:
        other.delete(namespace=(*PREFIX, "user-2"))
        _write(other, (*PREFIX, "user-new"), "doc-0", seed=4_242)
    for key in [key for key in _spans_of if key[0] == (*PREFIX, "user-2")]:
        del _spans_of[key]
    new_span = _spans_of[((*PREFIX, "user-new"), "doc-0")][0]
    assert _found(many, _vectors[new_span], 1) == [new_span]
    assert _found(many, query, 9) == _expected(many, query, 9)
    assert (*PREFIX, "user-new") in {
        hit.namespace for hit in many.search(query, 300, namespace=PREFIX)
    }
    with location.open() as other:
        _write(other, (*PREFIX, "user-9"), "late", seed=5_151)
    late = _spans_of[((*PREFIX, "user-9"), "late")][2]
    assert _found(many, _vectors[late], 1) == [late]
    assert _found(many, query, 9, {"even": True}) == _expected(many, query, 9, {"even": True})
