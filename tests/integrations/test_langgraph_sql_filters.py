"""The LangGraph store narrows searches and namespace listings in SQL (``sql_filters``) and must
still answer exactly like LangGraph's InMemoryStore: Python's ``1 == 1.0 == True``, numeric
strings in ranges, nested dicts and lists, ``None``, keys the store's filter language refuses."""

from __future__ import annotations

import pytest
from icmem.integrations.langgraph import ICAEMemory
from icmem.integrations.langgraph.filters import matches_filter
from icmem.integrations.langgraph.sql_filters import store_prefilter
from icmem.store import DocumentRecord
from langgraph.store.memory import InMemoryStore
from langgraph_fixtures import fresh_pipeline

VALUES = {
    "int1": {"v": 1, "s": "a"},
    "float1": {"v": 1.0, "s": "b"},
    "true": {"v": True, "s": "a"},
    "false": {"v": False, "s": "c"},
    "zero": {"v": 0, "s": "1"},
    "text1": {"v": "1", "s": "a"},
    "two": {"v": 2.5, "s": "b"},
    "big": {"v": 2**53 + 1, "s": "c"},
    "none": {"v": None, "s": "a"},
    "list": {"v": [1, 2], "s": "b"},
    "dict": {"v": {"x": 1}, "s": "c"},
    "missing": {"s": "a"},
    "quote": {'we"ird': "q", "s": "a"},
}
FILTERS = [
    {"v": 1},
    {"v": True},
    {"v": 0},
    {"v": False},
    {"v": 1.0},
    {"v": "1"},
    {"v": 2**53 + 1},
    {"v": None},
    {"v": [1, 2]},
    {"v": {"x": 1}},
    {"v": {"$eq": 1}},
    {"v": {"$ne": 1}},
    {"v": {"$in": [0, "1"]}},
    {"v": {"$in": [True, 2.5]}},
    {"v": {"$in": [None, 2.5]}},
    {"v": {"$nin": [1]}},
    {"v": {"$gt": 0}},
    {"v": {"$gte": 1, "$lt": 3}},
    {"v": 1, "s": "a"},
    {"s": "a", "v": {"$ne": True}},
    {'we"ird': "q"},
    {"s": "a\x00"},
    {"absent": 1},
]
NAMESPACES = [("u", "1"), ("u", "2"), ("w",)]


@pytest.fixture(scope="module")
def stores():
    pipeline = fresh_pipeline()
    ours = ICAEMemory(pipeline)
    reference = InMemoryStore()
    for i, (key, value) in enumerate(VALUES.items()):
        namespace = NAMESPACES[i % len(NAMESPACES)]
        ours.put(namespace, key, value, index=False)
        reference.put(namespace, key, value, index=False)
    # Documents that are not items live beside them and are never listed as items.
    pipeline.store.add(
        [
            DocumentRecord(id="plain", metadata={"v": 1, "s": "a"}, spans=[]),
            DocumentRecord(id="odd", metadata={"langgraph_item": "not a record"}, spans=[]),
        ],
        namespace=("x",),
    )
    yield ours, reference
    pipeline.close()


@pytest.mark.parametrize("filter_", FILTERS, ids=repr)
@pytest.mark.parametrize("prefix", [(), ("u",)])
def test_filtered_search_answers_like_inmemorystore(stores, filter_, prefix) -> None:
    ours, reference = stores
    got = [(i.namespace, i.key) for i in ours.search(prefix, filter=filter_, limit=100)]
    assert len(got) == len(set(got))
    # The meaning the store promises: LangGraph's, as filters.matches_filter writes it down.
    expected = {
        (NAMESPACES[i % len(NAMESPACES)], key)
        for i, (key, value) in enumerate(VALUES.items())
        if NAMESPACES[i % len(NAMESPACES)][: len(prefix)] == prefix
        and matches_filter(value, filter_)
    }
    assert set(got) == expected
    # InMemoryStore has no $in / $nin and fails a range over a list value; where it answers,
    # it answers the same.
    try:
        answered = reference.search(prefix, filter=filter_, limit=100)
    except (TypeError, ValueError):
        assert any(
            isinstance(c, dict) and {"$in", "$nin", "$gt", "$gte"} & set(c)
            for c in filter_.values()
        )
        return
    assert set(got) == {(i.namespace, i.key) for i in answered}


def test_listing_namespaces_answers_like_inmemorystore(stores) -> None:
    ours, reference = stores
    for prefix in (None, ("u",), ("w",)):
        assert ours.list_namespaces(prefix=prefix) == reference.list_namespaces(prefix=prefix)


def test_prefilter_narrows_only_what_sql_can_test() -> None:
    assert store_prefilter({"v": 1}) == {"v": {"$in": [1, True]}}
    assert store_prefilter({"v": "x", "n": {"$gt": 1}}) == {"v": "x"}
    assert store_prefilter({"v": {"$in": [True, 3]}}) == {"v": {"$in": [True, 1, 3]}}
    for left_to_python in ({"v": None}, {"v": [1]}, {"v": {"x": 1}}, {"v": {"$ne": 1}}):
        assert store_prefilter(left_to_python) is None


def test_ttl_sweep_finds_expired_items_in_sql_and_legacy_ones_too(tmp_path) -> None:
    import time
    from datetime import datetime, timedelta, timezone

    pipeline = fresh_pipeline(tmp_path / "store")
    memory = ICAEMemory(pipeline)
    try:
        memory.put(("u",), "due", {"text": "x"}, ttl=0.0005, index=False)
        memory.put(("u",), "later", {"text": "x"}, ttl=60.0, index=False)
        memory.put(("u",), "forever", {"text": "x"}, ttl=None, index=False)
        memory.put(("u",), "legacy-due", {"text": "x"}, index=False)
        memory.put(("u",), "legacy-later", {"text": "x"}, index=False)
        pipeline.store.add(
            [DocumentRecord(id="plain", metadata={"n": 1}, spans=[])], namespace=("u",)
        )
        # Items written before expiry times were kept as numbers: only the ISO time.
        past = (datetime.now(timezone.utc) - timedelta(minutes=5)).isoformat()
        future = (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()
        for key, expires in (("legacy-due", past), ("legacy-later", future)):
            (document,) = pipeline.get_documents([key], namespace=("u",))
            record = dict(document.metadata["langgraph_item"])
            record.pop("expires_ts")
            record.update(expires_at=expires, ttl=1.0)
            pipeline.update_metadata({key: {"langgraph_item": record}}, namespace=("u",))
        time.sleep(0.05)
        assert memory.sweep_ttl() == 2
        left = [d.id for d in pipeline.list_documents(("u",))]
        assert left == ["later", "forever", "legacy-later", "plain"]
        # The unexpired legacy item got its number: later sweeps find it by its time alone.
        (document,) = pipeline.get_documents(["legacy-later"], namespace=("u",))
        record = document.metadata["langgraph_item"]
        assert record["expires_ts"] == datetime.fromisoformat(future).timestamp()
        assert record["expires_at"] == future
    finally:
        memory.close()


def test_a_query_with_a_selective_filter_scores_like_the_unfiltered_ranking(tmp_path) -> None:
    """With a query, the filter's SQL superset narrows the index search to the spans of the
    items that may match; each item must keep the score (and rank) it has in the ranking of
    everything."""
    memory = ICAEMemory(fresh_pipeline(tmp_path / "store"), index={"fields": ["text"]})
    try:
        for i in range(30):
            text = f"note {i} about {('rivers', 'mountains', 'cities')[i % 3]}"
            memory.put(("u",), f"k{i}", {"text": text, "group": i % 5})
        everything = memory.search(("u",), query="mountains", limit=30)
        for group in range(5):
            found = memory.search(("u",), query="mountains", filter={"group": group}, limit=30)
            expected = [(i.key, i.score) for i in everything if i.value["group"] == group]
            assert [(i.key, i.score) for i in found] == expected
    finally:
        memory.close()
