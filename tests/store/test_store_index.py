"""The FAISS view on its own: exact flat search, the switch to IVF and back, deletes reaching
IVF, and index files that verify before they are parsed."""

from __future__ import annotations

import numpy as np
import pytest
from icmem.store import IndexFileError, IndexPolicy
from icmem.store.index import IndexFiles, NamespaceIndex
from store_testing import StoreLocation, make_document

DIM = 16
POLICY = IndexPolicy(flat_max=1_000)


def _clustered(n: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 40 centres, shaped like real embeddings rather than pure noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, DIM))
    points = centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, DIM))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def _exact(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(vectors @ query), kind="stable")[:k]]


def test_flat_search_is_exact_and_filter_restricts() -> None:
    vectors, ids = _clustered(500), np.arange(1000, 1500)
    shard = NamespaceIndex(DIM, POLICY)
    shard.add(ids, vectors)
    assert shard.kind == "flat"
    query = _clustered(1, seed=9)[0]
    scores, found = shard.search(query, 10)
    np.testing.assert_array_equal(found, _exact(ids, vectors, query, 10))
    np.testing.assert_allclose(scores, np.sort(vectors @ query)[::-1][:10], rtol=1e-5)
    allowed = ids[::7]
    _, found = shard.search(query, 5, allowed)
    np.testing.assert_array_equal(found, _exact(allowed, vectors[::7], query, 5))


def test_switches_to_ivf_then_back_to_flat_keeping_ids() -> None:
    vectors, ids = _clustered(3_000), np.arange(3_000) * 3 + 11
    shard = NamespaceIndex(DIM, POLICY)
    for start in range(0, 3_000, 500):
        shard.add(ids[start : start + 500], vectors[start : start + 500])
    assert shard.kind == "ivf" and shard.trained_on > POLICY.flat_max
    np.testing.assert_array_equal(shard.ids(), np.sort(ids))

    queries = _clustered(20, seed=5)
    recall = np.mean(
        [len(set(shard.search(q, 10)[1]) & set(_exact(ids, vectors, q, 10))) / 10 for q in queries]
    )
    assert recall >= 0.9
    # Filtered IVF searches probe every list, so they are exact.
    allowed = ids[::5]
    for q in queries[:5]:
        np.testing.assert_array_equal(
            shard.search(q, 10, allowed)[1], _exact(allowed, vectors[::5], q, 10)
        )

    doomed = ids[:2_600]
    shard.remove(doomed)
    assert shard.kind == "flat"
    np.testing.assert_array_equal(shard.ids(), np.sort(ids[2_600:]))
    np.testing.assert_array_equal(
        shard.search(queries[0], 10)[1], _exact(ids[2_600:], vectors[2_600:], queries[0], 10)
    )


def test_ivf_removes_in_place_and_survives_files(tmp_path) -> None:
    vectors, ids = _clustered(2_000), np.arange(2_000)
    shard = NamespaceIndex(DIM, POLICY, generation=7)
    shard.add(ids, vectors)
    shard.remove(ids[:300])
    assert shard.kind == "ivf"
    files = IndexFiles(tmp_path, DIM, POLICY)
    files.save("ns", shard)
    loaded = files.load("ns")
    assert (loaded.kind, loaded.generation, loaded.trained_on) == ("ivf", 7, shard.trained_on)
    np.testing.assert_array_equal(loaded.ids(), ids[300:])
    query = vectors[1_234]
    assert loaded.search(query, 1)[1][0] == 1_234


def test_index_files_refuse_damage_before_parsing(tmp_path) -> None:
    files = IndexFiles(tmp_path, DIM, POLICY)
    with pytest.raises(IndexFileError, match="missing"):
        files.load("absent")
    shard = NamespaceIndex(DIM, POLICY, generation=1)
    shard.add(np.arange(10), _clustered(10))
    files.save("ns", shard)
    index_path, manifest_path = files.paths("ns")
    index_path.write_bytes(index_path.read_bytes()[:-1])
    with pytest.raises(IndexFileError, match="checksum"):
        files.load("ns")
    manifest_path.write_text("{not json")
    with pytest.raises(IndexFileError, match="unreadable"):
        files.load("ns")


@pytest.mark.parametrize("bad", [{"flat_max": 10}, {"retrain_growth": 1.0}])
def test_policy_validation(bad: dict) -> None:
    with pytest.raises(ValueError, match=r"flat_max|retrain_growth"):
        IndexPolicy(**bad)


def test_store_with_ivf_namespace_stays_consistent(location: StoreLocation) -> None:
    ns = ("t", "a", "big")
    vectors = _clustered(1_300, seed=3)

    def vector(seed: int) -> np.ndarray:
        return vectors[seed % 1_300]

    with location.open(dim=DIM, index_policy=POLICY) as store:
        for batch in range(13):
            documents = [
                make_document(
                    f"d{batch}-{j}",
                    10,
                    seed=batch * 10 + j,
                    metadata={"batch": batch},
                    vector=vector,
                )
                for j in range(10)
            ]
            store.add(documents, namespace=ns)
        store.delete(namespace=ns, document_ids=[f"d0-{j}" for j in range(10)])
        assert store._index.shards[1].kind == "ivf"
        np.testing.assert_array_equal(store.index_ids(ns), store.span_ids(ns))
    with location.open(dim=DIM, index_policy=POLICY) as store:
        assert store.index_repairs == 0
        np.testing.assert_array_equal(store.index_ids(ns), store.span_ids(ns))
        # A filtered search on an IVF namespace is exact: compare with brute force over batch 5.
        query = _clustered(1, seed=77)[0]
        candidates = [(f"d5-{j}", p, (50 + j) * 100 + p) for j in range(10) for p in range(10)]
        scores = np.array([vector(seed) @ query for _, _, seed in candidates])
        expected = [candidates[i][:2] for i in np.argsort(-scores, kind="stable")[:5]]
        hits = store.search(query, 5, namespace=ns, filter={"batch": 5})
        assert [(h.document_id, h.position) for h in hits] == expected


def test_broad_filters_on_ivf_probe_a_share_of_lists_and_keep_recall() -> None:
    vectors, ids = _clustered(5_000, seed=4), np.arange(5_000) + 1
    shard = NamespaceIndex(DIM, POLICY)
    shard.add(ids, vectors)
    assert shard.kind == "ivf"
    nlist, nprobe = shard._index.nlist, shard._index.nprobe
    assert shard.filtered_nprobe(2_500) == 2 * nprobe < nlist  # half the vectors: twice the lists
    assert shard.filtered_nprobe(50) == nlist  # a selective filter: every list, exact
    allowed = ids[::2]
    queries = _clustered(30, seed=6)
    recall = np.mean(
        [
            len(set(shard.search(q, 10, allowed)[1]) & set(_exact(allowed, vectors[::2], q, 10)))
            / 10
            for q in queries
        ]
    )
    assert recall >= 0.9
    for q in queries:
        assert set(shard.search(q, 10, allowed)[1]) <= set(allowed.tolist())
