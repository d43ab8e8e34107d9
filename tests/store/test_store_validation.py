"""One validation for every backend: SQLite and Postgres accept and refuse exactly the same
records, metadata and arguments, and every refusal is a StoreError that names the problem."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from icmem.store import (
    DamagedStoreError,
    DocumentRecord,
    InvalidFilterError,
    InvalidRecordError,
    MemoryStore,
    SpanRecord,
    StoreDamageWarning,
    StoreError,
)
from icmem.store.schema import EmbeddingRow
from sqlalchemy import update
from store_testing import DIM, StoreLocation, embedding, make_document

NS = ("t", "a", "th")


def _document(key: str = "doc", *, text: str = "some text", **fields) -> DocumentRecord:
    span_fields = {
        k: fields.pop(k)
        for k in ("position", "token_count", "char_end", "content_id")
        if k in fields
    }
    span = SpanRecord(
        position=span_fields.get("position", 0),
        char_start=0,
        char_end=span_fields.get("char_end", 9),
        text=text,
        token_count=span_fields.get("token_count", 3),
        slots=None,
        embedding=embedding(1),
        content_id=span_fields.get("content_id"),
    )
    return DocumentRecord(id=key, spans=[span], **fields)


def _state(store: MemoryStore) -> tuple:
    stats = store.stats()
    return stats.namespaces, stats.documents, stats.spans, store.list_namespaces()


def _mutated_after_construction() -> DocumentRecord:
    document = _document(metadata={"x": 1.0})
    document.metadata["x"] = math.nan  # the record is frozen, its metadata dict is not
    return document


# Each case is stored on both backends: both must accept it, or both must refuse it with an
# InvalidRecordError whose message matches (when the record is built or when it is written).
# ``None`` means accepted.
RECORD_CASES = [
    pytest.param(lambda: _document("x" * 255), NS, None, id="id-255-chars"),
    pytest.param(lambda: _document("x" * 256), NS, "at most 255", id="id-256-chars"),
    pytest.param(lambda: _document("a\x00b"), NS, "NUL", id="id-with-nul"),
    pytest.param(lambda: _document("\ud800"), NS, "UTF-8", id="id-lone-surrogate"),
    pytest.param(lambda: _document(text="a\x00b"), NS, "NUL", id="text-with-nul"),
    pytest.param(lambda: _document(text="bad \udcff"), NS, "UTF-8", id="text-lone-surrogate"),
    pytest.param(lambda: _document(source="file\x00"), NS, "NUL", id="source-with-nul"),
    pytest.param(lambda: _document(content_hash="h" * 128), NS, None, id="content-hash-128"),
    pytest.param(
        lambda: _document(content_hash="h" * 129), NS, "at most 128", id="content-hash-129"
    ),
    pytest.param(lambda: _document(content_id="c" * 65), NS, "at most 64", id="content-id-65"),
    pytest.param(lambda: _document(position=2**31), NS, "position", id="position-2**31"),
    pytest.param(lambda: _document(token_count=2**31), NS, "token_count", id="token-count-2**31"),
    pytest.param(lambda: _document(char_end=2**31), NS, "char_end", id="char-end-2**31"),
    pytest.param(lambda: _document(), ("t" * 255, "a", "th"), None, id="tenant-255"),
    pytest.param(lambda: _document(), ("t" * 256, "a", "th"), "at most 255", id="tenant-256"),
    pytest.param(lambda: _document(), ("t", "a\x00", "th"), "NUL", id="agent-with-nul"),
    pytest.param(
        lambda: _document(metadata={"x": 1.5, "y": [1, "a", None, True]}), NS, None, id="json"
    ),
    pytest.param(lambda: _document(metadata={"x": math.nan}), NS, "NaN or infinity", id="meta-nan"),
    pytest.param(lambda: _document(metadata={"x": math.inf}), NS, "NaN or infinity", id="meta-inf"),
    pytest.param(
        lambda: _document(metadata={"x": [1.0, -math.inf]}),
        NS,
        "NaN or infinity",
        id="meta-list-inf",
    ),
    pytest.param(
        lambda: _document(metadata={"x": {"y": math.nan}}),
        NS,
        "NaN or infinity",
        id="meta-nested-nan",
    ),
    pytest.param(lambda: _document(metadata={"x": "a\x00"}), NS, "NUL", id="meta-value-nul"),
    pytest.param(lambda: _document(metadata={"x\x00": 1}), NS, "NUL", id="meta-key-nul"),
    pytest.param(
        lambda: _document(metadata={"x": {"y\x00": 1}}), NS, "NUL", id="meta-nested-key-nul"
    ),
    pytest.param(lambda: _document(metadata={"n": 2**63 - 1}), NS, None, id="meta-int64-max"),
    pytest.param(lambda: _document(metadata={"n": 2**63}), NS, "64-bit", id="meta-2**63"),
    pytest.param(lambda: _document(metadata={"n": -(2**70)}), NS, "64-bit", id="meta-minus-2**70"),
    pytest.param(_mutated_after_construction, NS, "NaN or infinity", id="meta-mutated-to-nan"),
]


@pytest.mark.parametrize(("build", "namespace", "refusal"), RECORD_CASES)
def test_backends_accept_and_refuse_the_same_records(
    store: MemoryStore, build: Callable[[], DocumentRecord], namespace: tuple, refusal: str | None
) -> None:
    store.add([make_document("kept", 1)], namespace=NS)
    before = _state(store)
    if refusal is None:
        document = build()
        added = store.add([document], namespace=namespace)
        hit = store.search(embedding(1), 1, namespace=namespace)[0]
        assert (hit.document_id, hit.text) == (added[0].id, document.spans[0].text)
        assert hit.metadata == document.metadata
        return
    with pytest.raises(InvalidRecordError, match=refusal):
        store.add([make_document("good", 1, seed=3), build()], namespace=namespace)
    with pytest.raises(InvalidRecordError, match=refusal):
        store.upsert([build()], namespace=namespace)
    assert _state(store) == before


def test_non_finite_metadata_never_breaks_filtered_search(store: MemoryStore) -> None:
    store.add([make_document("a", 1, metadata={"x": 1.0})], namespace=NS)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(InvalidRecordError, match="NaN or infinity"):
            store.add([make_document("b", 1, metadata={"x": bad})], namespace=NS)
    hits = store.search(embedding(0), 5, namespace=NS, filter={"x": {"$gte": 0}})
    assert [h.document_id for h in hits] == ["a"]


def test_legacy_non_finite_metadata_does_not_break_filtered_search(tmp_path) -> None:
    """A store written before the check may hold NaN metadata; SQLite's JSON functions reject
    such rows, which used to fail every filtered search of the namespace."""
    with MemoryStore.open(tmp_path / "s", dim=DIM) as store:
        store.add([make_document("good", 1, metadata={"x": 1})], namespace=NS)
        store.add([make_document("legacy", 1, seed=2, metadata={"x": 2})], namespace=NS)
        with store.engine.begin() as connection:
            connection.exec_driver_sql(
                "UPDATE icmem_documents SET metadata = '{\"x\": NaN}' WHERE key = 'legacy'"
            )
        for filter_ in ({"x": 1}, {"x": {"$gte": 0}}, {"x": {"$in": [1, 2]}}):
            hits = store.search(embedding(0), 5, namespace=NS, filter=filter_)
            assert [h.document_id for h in hits] == ["good"]
        unfiltered = {h.document_id for h in store.search(embedding(0), 5, namespace=NS)}
        assert unfiltered == {"good", "legacy"}


def _deep(levels: int, leaf: object = 1) -> object:
    value = leaf
    for _ in range(levels):
        value = {"x": value}
    return value


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        pytest.param({"tags": {"a", "b"}}, "is a set, which is not JSON", id="set"),
        pytest.param({"raw": b"\x00\x01"}, "is a bytes, which is not JSON", id="bytes"),
        pytest.param({"n": np.int64(3)}, r"int64.*\.item\(\)", id="numpy-int"),
        pytest.param({"n": np.float32(0.5)}, r"float32.*\.item\(\)", id="numpy-float32"),
        pytest.param({"n": 2**70}, "64-bit", id="2**70"),
        pytest.param({"deep": _deep(5_000)}, "nested more than 32 levels", id="5000-deep"),
        pytest.param({"x": [[[]]] * 2, "y": {1: "a"}}, "keys must be strings", id="int-key"),
    ],
)
def test_non_json_metadata_is_an_invalid_record(
    store: MemoryStore, metadata: dict, message: str
) -> None:
    with pytest.raises(InvalidRecordError, match=message):
        store.add([make_document("a", 1, metadata=metadata)], namespace=NS)
    assert store.stats().documents == 0


def test_numpy_float64_metadata_is_a_float(store: MemoryStore) -> None:
    store.add([make_document("a", 1, metadata={"score": np.float64(0.25)})], namespace=NS)
    hits = store.search(embedding(0), 1, namespace=NS, filter={"score": {"$lt": 0.5}})
    assert hits[0].metadata == {"score": 0.25}


def _deep_filter(levels: int) -> dict:
    filter_: dict = {"lang": "en"}
    for _ in range(levels):
        filter_ = {"$and": [filter_]}
    return filter_


@pytest.mark.parametrize(
    ("filter_", "message"),
    [
        pytest.param({1: "a"}, "keys must be non-empty strings", id="int-key"),
        pytest.param({"$or": [{2: "a"}]}, "keys must be non-empty strings", id="int-key-in-or"),
        pytest.param({"n": 2**70}, "64-bit", id="eq-2**70"),
        pytest.param({"n": {"$gt": 2**70}}, "64-bit", id="gt-2**70"),
        pytest.param({"n": {"$in": [1, 2**70]}}, "64-bit", id="in-2**70"),
        pytest.param({"n": math.inf}, "NaN or infinity", id="eq-inf"),
        pytest.param({"n": {"$lt": math.nan}}, "NaN or infinity", id="lt-nan"),
        pytest.param({"n": "a\x00"}, "NUL", id="nul-value"),
        pytest.param({"n\x00": 1}, "NUL", id="nul-key"),
        pytest.param(_deep_filter(500), "nested more than", id="500-deep"),
        pytest.param({"n": np.int64(1)}, "string, number or boolean", id="numpy-value"),
    ],
)
def test_bad_filters_are_invalid_filter_errors(
    store: MemoryStore, filter_: dict, message: str
) -> None:
    store.add([make_document("a", 1, metadata={"lang": "en", "n": 1})], namespace=NS)
    with pytest.raises(InvalidFilterError, match=message):
        store.search(embedding(0), 3, namespace=NS, filter=filter_)


def test_filters_nested_within_the_limit_work(store: MemoryStore) -> None:
    store.add([make_document("a", 1, metadata={"lang": "en"})], namespace=NS)
    hits = store.search(embedding(0), 3, namespace=NS, filter=_deep_filter(30))
    assert [h.document_id for h in hits] == ["a"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda s: s.search(embedding(0), True, namespace=NS), "k must", id="k-True"),
        pytest.param(lambda s: s.search(embedding(0), 2.0, namespace=NS), "k must", id="k-float"),
        pytest.param(
            lambda s: s.search(embedding(0), 3, namespace=None), "namespace", id="ns-None"
        ),
        pytest.param(lambda s: s.search(embedding(0), 3, namespace=7), "namespace", id="ns-int"),
        pytest.param(
            lambda s: s.delete(namespace=NS, document_ids=7), "document_ids", id="ids-int"
        ),
        pytest.param(lambda s: s.get_slots([2**70]), "span id", id="span-2**70"),
        pytest.param(lambda s: s.get_slots(["1"]), "span id", id="span-str"),
        pytest.param(lambda s: s.get_slots("12"), "span id", id="spans-str"),
        pytest.param(
            lambda s: s.search(np.full(DIM, 3e38, np.float32), 3, namespace=NS),
            "too large",
            id="query-3e38",
        ),
        pytest.param(
            lambda s: s.search(embedding(0) * 1j, 3, namespace=NS), "complex", id="query-complex"
        ),
        pytest.param(
            lambda s: s.search(np.array(["1"] * DIM), 3, namespace=NS), "numbers", id="query-str"
        ),
    ],
)
def test_bad_arguments_are_store_errors(store: MemoryStore, call, message: str) -> None:
    store.add([make_document("a", 1)], namespace=NS)
    with pytest.raises(StoreError, match=message):
        call(store)


@pytest.mark.parametrize(
    ("vector", "message"),
    [
        pytest.param(np.full(DIM, 3e38, np.float32), "too large", id="3e38"),
        pytest.param(embedding(5).astype(np.complex64), "complex", id="complex"),
        pytest.param(np.array([str(x) for x in embedding(5)]), "numbers", id="strings"),
        pytest.param(np.ones(DIM, bool), "numbers", id="bools"),
    ],
)
def test_unusable_embeddings_are_refused_not_stored(
    store: MemoryStore, vector: np.ndarray, message: str
) -> None:
    with pytest.raises(InvalidRecordError, match=message):
        store.add([make_document("a", 1, vector=lambda _seed: vector)], namespace=NS)
    assert store.stats().spans == 0


def test_truncated_embedding_row_is_skipped_with_a_warning(location: StoreLocation) -> None:
    with location.open() as store:
        added = store.add([make_document(f"d{i}", 2, seed=i) for i in range(3)], namespace=NS)
    damaged = added[1].span_ids[0]
    with location.open() as store, store.engine.begin() as connection:
        connection.execute(
            update(EmbeddingRow).where(EmbeddingRow.span_id == damaged).values(vector=b"\x00" * 7)
        )
    for path in location.index_dir.iterdir():
        path.unlink()
    with location.open() as store:
        with pytest.warns(StoreDamageWarning, match=f"span ids \\[{damaged}\\]"):
            hits = store.search(embedding(100), 6, namespace=NS)
        assert damaged not in {h.span_id for h in hits} and len(hits) == 5
        assert len(store.search(embedding(101), 6, namespace=NS)) == 5  # and every later one
        assert store.check().damaged_embeddings == (damaged,)


def test_damaged_database_pages_are_a_store_error(tmp_path) -> None:
    path = tmp_path / "s"
    with MemoryStore.open(path, dim=DIM) as store:
        store.add([make_document(f"d{i}", 3, seed=i) for i in range(200)], namespace=NS)
        with store.engine.connect() as connection:
            page_size = connection.exec_driver_sql("PRAGMA page_size").scalar()
            roots = connection.exec_driver_sql(
                "SELECT rootpage FROM sqlite_master WHERE name IN ('icmem_spans', 'icmem_slots')"
            ).scalars()
            roots = list(roots)
            connection.rollback()
    database = path / "store.sqlite"
    with open(database, "r+b") as handle:  # overwrite the root pages of two tables
        for root in roots:
            handle.seek((root - 1) * page_size)
            handle.write(b"\xa5" * page_size)
    with MemoryStore.open(path, dim=DIM, read_only=True) as store:
        with pytest.raises(DamagedStoreError, match=r"damaged.*backup"):
            store.stats()
        with pytest.raises(DamagedStoreError, match="damaged"):
            store.search(embedding(0), 3, namespace=NS)
