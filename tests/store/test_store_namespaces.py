"""Namespaces of any depth (1 to 16 labels): exact and prefix matching that never leaves the
prefix, whatever the labels hold; checked against SQLite and PostgreSQL alike."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from icmem.store import InvalidRecordError, MemoryStore, UnknownSpanError
from icmem.store.namespaces import (
    MAX_NAMESPACE_DEPTH,
    decode_path,
    encode_path,
    format_namespace,
    parse_namespace,
)
from sqlalchemy import text
from store_testing import StoreLocation, embedding, make_document

from icmem.cli import build_parser

# Each pair of neighbours would be confused by a naive encoding: a joined string, a LIKE pattern,
# a missing terminator or a label holding the separator.
AWKWARD = [
    ("a",),
    ("ab",),
    ("a", "b"),
    ("a/b",),
    ("a", "b", "c"),
    ("a", "bc"),
    ("a%",),
    ("a_",),
    ("a", "%"),
    ("a", "_"),
    ("%",),
    ("_",),
    ("a\nb",),
    ("a", "\n"),
    ('a"',),
    ("a\\",),
    ("a\x1f",),
    ("a", "\x1f"),
    ("\x1f",),
    ("ünï", "cødé", "🙂"),
    ("users", "u/1", "memories"),
    ("org", "team", "project", "notes"),
    tuple(f"l{i}" for i in range(MAX_NAMESPACE_DEPTH)),
]


def _under(namespace: tuple[str, ...], prefix: tuple[str, ...]) -> bool:
    return namespace[: len(prefix)] == prefix


@pytest.fixture
def awkward(store: MemoryStore) -> MemoryStore:
    for i, ns in enumerate(AWKWARD):
        store.add(
            [make_document(f"d{i}", 2, seed=i, metadata={"i": i, "even": i % 2 == 0})],
            namespace=ns,
        )
    return store


def test_encoding_round_trips_and_is_prefix_free() -> None:
    for ns in AWKWARD:
        assert decode_path(encode_path(ns)) == ns
    for p in AWKWARD:
        for q in AWKWARD:
            assert encode_path(q).startswith(encode_path(p)) == _under(q, p), (p, q)


def test_every_prefix_sees_exactly_its_namespaces(awkward: MemoryStore) -> None:
    assert awkward.list_namespaces() == sorted(AWKWARD)
    for prefix in AWKWARD:
        below = sorted(ns for ns in AWKWARD if _under(ns, prefix))
        assert awkward.list_namespaces(prefix) == below, prefix
        docs = awkward.list_documents(prefix)
        assert sorted({d.namespace for d in docs}) == below
        hits = awkward.search(embedding(0), 100, namespace=prefix)
        assert sorted({h.namespace for h in hits}) == below, prefix
        filtered = awkward.search(embedding(0), 100, namespace=prefix, filter={"even": True})
        assert all(_under(h.namespace, prefix) and h.metadata["even"] for h in filtered)
        assert {h.namespace for h in filtered} == {ns for ns in below if AWKWARD.index(ns) % 2 == 0}
        assert awkward.stats(prefix).namespaces == len(below)


def test_a_never_matches_ab(awkward: MemoryStore) -> None:
    hits = awkward.search(embedding(0), 100, namespace=("a",))
    assert ("ab",) not in {h.namespace for h in hits}
    assert ("a/b",) not in {h.namespace for h in hits}
    assert ("a%",) not in {h.namespace for h in hits}
    assert awkward.list_namespaces(("%",)) == [("%",)]
    assert awkward.list_namespaces(("_",)) == [("_",)]


def test_exact_reads_and_writes_address_one_namespace(awkward: MemoryStore) -> None:
    # ("a",) holds d0; the namespaces below it hold their own documents, not d0.
    assert [d.id for d in awkward.list_documents(("a",)) if d.namespace == ("a",)] == ["d0"]
    assert [d.id for d in awkward.list_documents(("a",), exact=True)] == ["d0"]
    a_spans = awkward.span_ids(("a",))
    assert len(a_spans) == 2
    np.testing.assert_array_equal(awkward.index_ids(("a",)), a_spans)
    assert awkward.delete(namespace=("a",), document_ids=["d2"]) == 0  # d2 lives in ("a", "b")
    assert awkward.delete(namespace=("a", "b"), document_ids=["d2"]) == 1
    assert ("a", "b") in awkward.list_namespaces()  # emptied, not removed
    assert len(awkward.span_ids(("a", "b"))) == 0


def test_get_slots_refuses_spans_outside_the_prefix(awkward: MemoryStore) -> None:
    ab_span = int(awkward.span_ids(("ab",))[0])
    a_span = int(awkward.span_ids(("a", "b", "c"))[0])
    assert [s.span_id for s in awkward.get_slots([a_span], namespace=("a",))] == [a_span]
    with pytest.raises(UnknownSpanError):
        awkward.get_slots([ab_span], namespace=("a",))
    with pytest.raises(UnknownSpanError):
        awkward.get_slots([a_span], namespace=("a%",))


def _prefix_rows(store: MemoryStore) -> int:
    with store.engine.connect() as connection:
        count = connection.scalar(text("SELECT count(*) FROM icmem_namespace_prefixes"))
        connection.rollback()
    return count


def test_deleting_a_prefix_removes_it_and_what_is_below_only(awkward: MemoryStore) -> None:
    assert _prefix_rows(awkward) == sum(len(ns) for ns in AWKWARD)  # every prefix of each
    below = [ns for ns in AWKWARD if _under(ns, ("a",))]
    assert awkward.delete(namespace=("a",)) == len(below)
    assert awkward.list_namespaces() == sorted(ns for ns in AWKWARD if ns not in below)
    assert _prefix_rows(awkward) == sum(len(ns) for ns in AWKWARD if ns not in below)
    assert ("ab",) in awkward.list_namespaces()
    assert len(awkward.search(embedding(1), 5, namespace=("ab",))) == 2


def test_depth_and_label_limits(store: MemoryStore) -> None:
    deepest = tuple(str(i) for i in range(MAX_NAMESPACE_DEPTH))
    store.add([make_document("deep", 1)], namespace=deepest)
    assert store.list_namespaces(deepest[:1]) == [deepest]
    for bad in [(), (*deepest, "x"), ("a", ""), ("a\x00",), ("x" * 256,), "abc", ("a", 1)]:
        with pytest.raises(InvalidRecordError, match="namespace"):
            store.add([make_document("bad", 1)], namespace=bad)
        with pytest.raises(InvalidRecordError, match="namespace"):
            store.search(embedding(0), 1, namespace=bad)
    store.add([make_document("list", 1)], namespace=["as", "a", "list"])
    assert ("as", "a", "list") in store.list_namespaces()


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_cli_prints_and_reads_any_label(tmp_path, capsys) -> None:
    path = str(tmp_path / "store")
    odd = [("users", "u/1", "memo\nries"), ("users", "u", "1"), ("[x]", "y")]
    with MemoryStore.open(path, dim=16) as store:
        for i, ns in enumerate(odd):
            store.add([make_document(f"d{i}", 1, seed=i)], namespace=ns)
    assert _run(["store", "namespaces", path, "--dim", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [tuple(json.loads(line)) for line in lines] == sorted(odd)
    assert [parse_namespace(line) for line in lines] == sorted(odd)
    assert format_namespace(odd[0]) == '["users", "u/1", "memo\\nries"]'
    prefix = json.dumps(["users", "u/1"])
    assert _run(["store", "stats", path, "--dim", "16", "--namespace", prefix]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 1
    assert _run(["store", "stats", path, "--dim", "16", "--namespace", "users/u"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 1  # ("users", "u"), not "u/1"
    assert parse_namespace("a/b") == ("a", "b")
    for bad in ["[", '["a", 1]', '["a", ["b"]]', "a//b", "[]"]:
        with pytest.raises(InvalidRecordError):
            parse_namespace(bad)


# Labels drawn from characters that break naive encodings: separators, LIKE wildcards, quotes,
# escapes, control characters, the path terminator itself and non-ASCII.
_LABEL = st.text(alphabet=list("ab/%_\\\"'\n\x1f\x01é🙂 [],"), min_size=1, max_size=4)
_NAMESPACE = st.lists(_LABEL, min_size=1, max_size=4).map(tuple)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    namespaces=st.lists(_NAMESPACE, min_size=1, max_size=6, unique=True),
    prefixes=st.lists(_NAMESPACE, min_size=1, max_size=4),
)
def test_any_labels_any_prefix_never_leave_the_prefix(
    location: StoreLocation, namespaces, prefixes
) -> None:
    # Each example lives under its own root label, so examples share one database safely.
    root = uuid.uuid4().hex[:8]
    stored = [(root, *ns) for ns in namespaces]
    with location.open() as store:
        for i, ns in enumerate(stored):
            store.add([make_document(f"d{i}", 1, seed=i, metadata={"i": i})], namespace=ns)
        candidates = [(root, *p) for p in prefixes] + [
            ns[:depth] for ns in stored for depth in (2, 3)
        ]
        for prefix in candidates:
            below = sorted(ns for ns in stored if _under(ns, prefix))
            assert store.list_namespaces(prefix) == below
            hits = store.search(embedding(0), 50, namespace=prefix)
            assert sorted({h.namespace for h in hits}) == below
            filtered = store.search(embedding(0), 50, namespace=prefix, filter={"i": {"$gte": 0}})
            assert sorted({h.namespace for h in filtered}) == below
            assert [d.namespace for d in store.list_documents(prefix, exact=True)] == (
                [prefix] if prefix in stored else []
            )
