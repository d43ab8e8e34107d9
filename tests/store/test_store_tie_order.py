"""Issue 22, item 9: equal scores come back in one defined order, ascending span id, from a
namespace's index (flat and IVF, filtered or not), from the merge over several namespaces, and
from the store on both backends, whatever order the vectors were added in."""

from __future__ import annotations

import numpy as np
import pytest
from icmem.store import IndexPolicy
from icmem.store.index import NamespaceIndex
from store_testing import DIM, StoreLocation, make_document

POLICY = IndexPolicy(flat_max=1_000)


def _unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


SAME = _unit(1)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_ties_in_one_index_come_back_by_ascending_id(k: int) -> None:
    shard = NamespaceIndex(DIM, POLICY)
    ids = np.array([50, 30, 90, 10, 70], np.int64)  # added out of id order
    shard.add(ids, np.tile(SAME, (len(ids), 1)))
    shard.add(np.array([5], np.int64), (-SAME).reshape(1, DIM))  # worse than every tie
    scores, found = shard.search(SAME, k)
    assert found.tolist() == sorted(ids.tolist())[:k]
    assert np.all(scores == scores[0])
    _, found = shard.search(SAME, k, allowed=np.array([90, 70, 30, 5], np.int64))
    assert found.tolist() == [30, 70, 90, 5][:k]


def test_ties_in_an_ivf_index_come_back_by_ascending_id() -> None:
    rng = np.random.default_rng(3)
    others = rng.standard_normal((2_600, DIM)).astype(np.float32)
    others /= np.linalg.norm(others, axis=1, keepdims=True)
    shard = NamespaceIndex(DIM, POLICY)
    shard.add(np.arange(10_000, 12_600, dtype=np.int64), others)
    tied = np.array([907, 905, 903, 901], np.int64)
    shard.add(tied, np.tile(SAME, (len(tied), 1)))
    assert shard.kind == "ivf"
    _, found = shard.search(SAME, 2)
    assert found.tolist() == [901, 903]


def test_store_orders_ties_by_span_id_across_namespaces_and_filters(
    location: StoreLocation,
) -> None:
    def same(_seed: int) -> np.ndarray:
        return SAME

    with location.open() as store:
        for i, ns in enumerate([("t", "b"), ("t", "a"), ("t", "b"), ("t", "a"), ("t", "c")]):
            document = make_document(f"d{i}", 2, seed=i, metadata={"n": i}, vector=same)
            store.add([document], namespace=ns)
        # Re-adding the first document gives its spans the largest ids.
        store.upsert(
            [make_document("d0", 2, seed=9, metadata={"n": 0}, vector=same)], namespace=("t", "b")
        )
        every = sorted(int(i) for ns in store.list_namespaces() for i in store.span_ids(ns))
        for k in (1, 3, 6, 10):
            hits = store.search(SAME, k, namespace=("t",))
            assert [h.span_id for h in hits] == every[:k]
        hits = store.search(SAME, 3, namespace=("t",), filter={"n": {"$gte": 2}})
        allowed = sorted(
            int(h.span_id)
            for h in store.search(SAME, 100, namespace=("t",))
            if h.metadata["n"] >= 2
        )
        assert [h.span_id for h in hits] == allowed[:3]
    with location.open() as reopened:  # the index is loaded from files, or rebuilt: same order
        assert [h.span_id for h in reopened.search(SAME, 6, namespace=("t",))] == every[:6]


def test_store_orders_ties_by_span_id_after_a_rebuild(location: StoreLocation) -> None:
    def same(_seed: int) -> np.ndarray:
        return SAME

    with location.open() as store:
        for i in range(6):
            store.add([make_document(f"d{i}", 3, seed=i, vector=same)], namespace=("t",))
        store.delete(namespace=("t",), document_ids=["d1", "d4"])
        store.upsert([make_document("d2", 3, seed=7, vector=same)], namespace=("t",))
        expected = store.span_ids(("t",)).tolist()
        store.rebuild_index()
        assert [h.span_id for h in store.search(SAME, 5, namespace=("t",))] == expected[:5]
