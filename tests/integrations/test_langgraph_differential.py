"""ICAEMemory against LangGraph's own InMemoryStore: the same random sequences of batches of
put, delete, get, list and search (with filters, queries, limits and offsets) on both must give
the same results, item for item; scores must agree too (both rank by cosine similarity of the
same embedder's vectors; ours come from float32 FAISS, hence the tolerance).

Three of InMemoryStore's habits are normalised. It orders namespaces by first touch (a `get`
creates one), so every namespace is touched once up front in sorted order, ours. It lists
namespaces that a read created or whose items were all deleted, so listings are compared with its
empty namespaces left out. It fails a batch that puts the same text twice (it embeds each text
once, then miscounts), so it is given each batch's reads as one batch and then the puts one at a
time, which is what a batch means: reads see the state before the batch, the last put wins.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from icmem.integrations.langchain import ICAEEmbeddings
from icmem.integrations.langgraph import ICAEMemory
from langgraph.store.base import GetOp, ListNamespacesOp, MatchCondition, PutOp, SearchOp
from langgraph.store.memory import InMemoryStore
from langgraph_fixtures import fresh_pipeline

NAMESPACES = [("a",), ("a", "x"), ("a", "x", "z"), ("a", "y"), ("b", "x")]
KEYS = ["k1", "k2", "k3", "k4"]
TOLERANCE = 1e-4  # ours are float32 inner products, InMemoryStore's float64 cosines
TEXTS = [
    "Paris is the capital of France",
    "the quick brown fox jumps",
    "Berlin is the capital of Germany",
    "numbers, names and places",
    "a memory keeps what matters",
]
FILTERS = [
    None,
    {"tag": "red"},
    {"n": {"$gte": 2}},
    {"n": {"$ne": 1}, "tag": "blue"},
    {"meta": {"tag": "red"}},
    {"n": {"$lt": 2, "$gt": 0}},
]

values = st.builds(
    lambda text, n, tag: {"text": text, "n": n, "tag": tag, "meta": {"tag": tag, "n": [n]}},
    st.sampled_from(TEXTS),
    st.integers(0, 3),
    st.sampled_from(["red", "blue"]),
)
namespaces = st.sampled_from(NAMESPACES)
prefixes = st.sampled_from([(), ("a",), ("a", "x"), ("b",)])
keys = st.sampled_from(KEYS)
puts = st.builds(lambda ns, key, value: PutOp(ns, key, value), namespaces, keys, values)
deletes = st.builds(lambda ns, key: PutOp(ns, key, None), namespaces, keys)
gets = st.builds(lambda ns, key: GetOp(ns, key), namespaces, keys)
searches = st.builds(
    lambda prefix, filter, limit, offset, query: SearchOp(prefix, filter, limit, offset, query),
    prefixes,
    st.sampled_from(FILTERS),
    st.integers(1, 5),
    st.integers(0, 3),
    st.none() | st.sampled_from([*TEXTS, "capital city", "fox"]),
)
conditions = st.lists(
    st.builds(
        lambda kind, path: MatchCondition(kind, path),
        st.sampled_from(["prefix", "suffix"]),
        st.sampled_from([("a",), ("a", "*"), ("x",), ("*", "x"), ("b", "x")]),
    ),
    max_size=2,
).map(tuple)
listings = st.builds(
    lambda conditions, depth, limit, offset: ListNamespacesOp(conditions, depth, limit, offset),
    conditions,
    st.none() | st.integers(1, 3),
    st.integers(1, 5),
    st.integers(0, 2),
)
# Reads are cheap and writes compress: weight towards reads, so each example checks many
# (hypothesis also leans to the first branches of one_of).
operations = st.one_of(searches, searches, listings, gets, puts, deletes)
# After every batch, every filter is also checked over everything, with and without a query.
PROBES = [
    *(SearchOp((), filter, 20) for filter in FILTERS),
    *(SearchOp((), filter, 20, query="capital") for filter in FILTERS[:3]),
    ListNamespacesOp(max_depth=2, limit=20),
]
# A first batch of puts gives the reads something to find; then mixed batches.
batches = st.tuples(
    st.lists(puts, min_size=3, max_size=8),
    st.lists(st.lists(operations, min_size=1, max_size=4), min_size=2, max_size=8),
).map(lambda first_and_rest: [first_and_rest[0], *first_and_rest[1]])


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,  # the same examples in every run: CI never flakes on a new draw
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(batches=batches)
def test_icae_memory_answers_like_inmemorystore(batches):
    pipeline = fresh_pipeline()
    try:
        ours = ICAEMemory(pipeline, index={"fields": ["text"]})
        reference = InMemoryStore(
            index={"dims": 32, "embed": ICAEEmbeddings(pipeline), "fields": ["text"]}
        )
        for namespace in sorted(NAMESPACES):
            reference.get(namespace, "touch")  # InMemoryStore orders namespaces by first touch
        for batch in [step for written in batches for step in (written, PROBES)]:
            expected = _reference_batch(reference, batch)
            got = ours.batch(batch)
            for op, want, have in zip(batch, expected, got, strict=True):
                _assert_same(op, want, have)
    finally:
        pipeline.close()


def _reference_batch(reference: InMemoryStore, batch):
    """A batch on InMemoryStore: its reads first, then its puts one at a time."""
    answers = [
        _listing_without_empty_namespaces(reference, op)
        if isinstance(op, ListNamespacesOp)
        else None
        if isinstance(op, PutOp)
        else reference.batch([op])[0]
        for op in batch
    ]
    for op in batch:
        if isinstance(op, PutOp):
            reference.batch([op])
    return answers


def _listing_without_empty_namespaces(reference: InMemoryStore, op: ListNamespacesOp):
    pruned = InMemoryStore()
    pruned._data.update({ns: items for ns, items in reference._data.items() if items})
    return pruned.batch([op])[0]


def _assert_same(op, want, have) -> None:
    if isinstance(op, GetOp):
        assert _item(have) == _item(want), op
    elif isinstance(op, SearchOp) and op.query:
        _assert_same_ranking(op, want, have)
    elif isinstance(op, SearchOp):
        assert [_item(i) for i in have] == [_item(i) for i in want], op
    else:
        assert have == want, op


def _assert_same_ranking(op, want, have) -> None:
    """Equal scores rank by position, but the same text embedded twice differs in its last
    bits, so items whose scores are within the tolerance may trade places (also across the
    limit). Everything else must match: the scores rank by rank, each item's own score, and
    every item not tied with the last one returned."""
    assert [i.score for i in have] == pytest.approx([i.score for i in want], abs=TOLERANCE), op
    theirs = {(i.namespace, i.key): i for i in want}
    for item in have:
        if (item.namespace, item.key) in theirs:
            reference = theirs[(item.namespace, item.key)]
            assert item.value == reference.value, op
            assert item.score == pytest.approx(reference.score, abs=TOLERANCE), op
    if want:
        cutoff = want[-1].score
        clear = {(i.namespace, i.key) for i in want if abs(i.score - cutoff) > TOLERANCE}
        assert clear <= {(i.namespace, i.key) for i in have}, op


def _item(item):
    return None if item is None else (item.namespace, item.key, item.value)
