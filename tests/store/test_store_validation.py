"""One validation for every backend: SQLite and Postgres accept and refuse exactly the same
records, metadata and arguments, and every refusal is a StoreError that names the problem."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from conftest import DIM, embedding, make_document
from icmem.store import (
    DocumentRecord,
    InvalidRecordError,
    MemoryStore,
    SpanRecord,
)

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
