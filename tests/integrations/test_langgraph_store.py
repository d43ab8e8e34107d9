"""ICAEMemory as a LangGraph BaseStore: the contract BaseStore documents (batches, namespaces,
search, listing), what icmem adds (values kept exactly and recalled as slots, no re-encoding of
unchanged text, persistence, TTL), and errors on bad input.

The langgraph package ships no store conformance suite (its store tests live in its repository,
outside the wheel); the contract tests here follow BaseStore's documentation instead, and the
differential test (test_langgraph_differential.py) holds ours to InMemoryStore's answers."""

from __future__ import annotations

import asyncio
import time

import pytest
from icmem.integrations.langgraph import ICAEMemory
from langgraph.store.base import GetOp, InvalidNamespaceError, PutOp, SearchOp
from langgraph_fixtures import fresh_pipeline

USER = ("users", "u1")


@pytest.fixture
def memory(tmp_path):
    opened = ICAEMemory(fresh_pipeline(tmp_path / "store"), index={"fields": ["text"]})
    yield opened
    opened.close()


def test_list_namespaces_as_basestore_documents_it(memory):
    for namespace in [("a", "b", "c"), ("a", "b", "d", "e"), ("a", "b", "d", "i"), ("a", "b", "f")]:
        memory.put(namespace, "k", {"text": "x"})
    memory.put(("a", "c", "f"), "k", {"text": "x"})
    assert memory.list_namespaces(prefix=("a", "b"), max_depth=3) == [
        ("a", "b", "c"),
        ("a", "b", "d"),
        ("a", "b", "f"),
    ]
    assert memory.list_namespaces(suffix=("f",)) == [("a", "b", "f"), ("a", "c", "f")]
    assert memory.list_namespaces(prefix=("a", "*", "f")) == [("a", "b", "f"), ("a", "c", "f")]
    assert memory.list_namespaces(limit=2, offset=1) == [("a", "b", "d", "e"), ("a", "b", "d", "i")]
    memory.delete(("a", "c", "f"), "k")
    assert ("a", "c", "f") not in memory.list_namespaces()  # no items left: not listed


def test_values_round_trip_exactly_and_survive_reopening(memory, tmp_path):
    value = {"text": "héllo\nworld", "n": 3, "x": 1.5, "ok": True, "none": None, "l": [1, "a", {}]}
    memory.put(USER, "v", value)
    item = memory.get(USER, "v")
    assert item.value == value and item.key == "v" and item.namespace == USER
    created = item.created_at
    memory.put(USER, "v", {**value, "n": 4})
    again = memory.get(USER, "v")
    assert again.created_at == created and again.updated_at > created
    memory.close()
    reopened = ICAEMemory(fresh_pipeline(tmp_path / "store"))
    assert reopened.get(USER, "v").value == {**value, "n": 4}
    reopened.close()


def test_items_are_memory_chat_icae_recalls(memory):
    memory.put(USER, "fact", {"text": "Paris is the capital of France", "source": "atlas"})
    recalled = memory.pipeline.recall("capital of France", namespace=USER, k=1)
    assert [h.document_id for h in recalled.hits] == ["fact"]
    assert recalled.hits[0].text == "Paris is the capital of France"
    assert recalled.memory[0].num_slots > 0


def test_unchanged_text_is_not_encoded_again(memory, monkeypatch):
    memory.put(USER, "fact", {"text": "Paris is the capital of France", "seen": 1})
    spans = memory.pipeline.store.span_ids(USER).tolist()
    compressed = []
    real = memory.pipeline.icae.compress
    monkeypatch.setattr(
        memory.pipeline.icae, "compress", lambda *a, **k: compressed.append(a) or real(*a, **k)
    )
    memory.put(USER, "fact", {"text": "Paris is the capital of France", "seen": 2})
    assert compressed == [] and memory.pipeline.store.span_ids(USER).tolist() == spans
    assert memory.search(USER, query="capital", filter={"seen": 2})[0].key == "fact"
    memory.put(USER, "fact", {"text": "Berlin is the capital of Germany", "seen": 2})
    assert len(compressed) == 1 and memory.pipeline.store.span_ids(USER).tolist() != spans


def test_index_choices(memory):
    memory.put(USER, "plain", {"text": "Paris is the capital"}, index=False)
    memory.put(USER, "other", {"title": "Paris", "text": "unrelated"}, index=["title"])
    memory.put(USER, "default", {"text": "Paris is the capital"})
    assert memory.pipeline.store.stats(USER).documents == 3
    counts = {d.id: d.span_count for d in memory.pipeline.list_documents(USER)}
    assert counts == {"plain": 0, "other": 1, "default": 1}
    found = memory.search(USER, query="Paris is the capital")
    assert [i.key for i in found][-1] == "plain" and found[-1].score is None  # unscored last
    assert all(i.score is not None for i in found[:-1])
    whole = ICAEMemory(memory.pipeline)  # default index: the whole value as JSON
    whole.put(("json",), "k", {"a": "b"})
    (hit,) = memory.pipeline.search("x", namespace=("json",), k=1)
    assert hit.text == '{"a": "b"}'


def test_batch_reads_see_the_state_before_its_writes(memory):
    memory.put(USER, "k", {"text": "old"})
    results = memory.batch(
        [
            PutOp(USER, "k", {"text": "new"}),
            GetOp(USER, "k"),
            PutOp(USER, "k", {"text": "newest"}),
            SearchOp(USER),
        ]
    )
    assert results[0] is None and results[1].value == {"text": "old"}
    assert [i.value for i in results[3]] == [{"text": "old"}]
    assert memory.get(USER, "k").value == {"text": "newest"}


def test_search_pages_and_filters(memory):
    for i in range(5):
        memory.put(USER, f"k{i}", {"text": f"note {i}", "i": i, "tags": {"even": i % 2 == 0}})
    assert [i.key for i in memory.search(USER, limit=2, offset=1)] == ["k1", "k2"]
    evens = memory.search(USER, filter={"tags": {"even": True}})
    assert [i.key for i in evens] == ["k0", "k2", "k4"]
    assert [i.key for i in memory.search(USER, filter={"i": {"$in": [1, 3]}})] == ["k1", "k3"]
    ranked = memory.search(USER, query="note 3", limit=5)
    assert len(ranked) == 5 and ranked[0].key == "k3"
    assert memory.search(USER, query="note 3", limit=2, offset=4)[0].key == ranked[4].key
    with pytest.raises(ValueError, match="unknown filter operator"):
        memory.search(USER, filter={"i": {"$regex": "1"}})


async def test_async_batches_answer_like_sync(memory):
    await memory.aput(USER, "a", {"text": "Paris is the capital of France"})
    await memory.aput(USER, "b", {"text": "the quick brown fox"})
    ops = [GetOp(USER, "a"), SearchOp(USER, query="fox"), SearchOp(("users",), {"text": "x"})]
    asynchronous = await memory.abatch(ops)
    synchronous = memory.batch(ops)
    assert asynchronous[0] == synchronous[0]
    assert [(i.key, i.score) for i in asynchronous[1]] == [(i.key, i.score) for i in synchronous[1]]
    assert asynchronous[2] == synchronous[2] == []
    await memory.adelete(USER, "a")
    assert await memory.aget(USER, "a") is None
    assert await memory.alist_namespaces() == [USER]


def test_ttl_expiry_refresh_and_sweeping(tmp_path):
    ttl = {"default_ttl": 1.0, "refresh_on_read": True, "omit_expired": True}
    memory = ICAEMemory(fresh_pipeline(tmp_path / "store"), ttl=ttl)
    assert memory.supports_ttl
    memory.put(USER, "short", {"text": "gone soon"}, ttl=0.0005)  # 30 ms
    memory.put(USER, "kept", {"text": "stays"}, ttl=None)
    memory.put(USER, "default", {"text": "an hour... a minute"})

    def expiry(key: str) -> str | None:
        (document,) = memory.pipeline.get_documents([key], namespace=USER)
        return document.metadata["langgraph_item"]["expires_at"]

    assert expiry("kept") is None
    before = expiry("default")
    time.sleep(0.05)
    assert memory.get(USER, "short") is None  # expired: omitted before any sweep
    assert expiry("default") == before
    memory.get(USER, "default")  # too soon to move the expiry by 1% of the TTL (0.6 s)
    assert expiry("default") == before
    time.sleep(0.6)
    memory.get(USER, "default")  # now a read pushes the expiry back
    assert expiry("default") > before
    memory.get(USER, "default", refresh_ttl=False)
    assert memory.sweep_ttl() == 1
    assert [d.id for d in memory.pipeline.list_documents(USER)] == ["kept", "default"]

    memory.put(USER, "short", {"text": "gone soon"}, ttl=0.0005)
    memory.start_ttl_sweeper(sweep_interval_minutes=0.0005)
    deadline = time.monotonic() + 30
    while memory.pipeline.get_documents(["short"], namespace=USER):
        assert time.monotonic() < deadline, "the sweeper never deleted the expired item"
        time.sleep(0.02)
    assert memory.stop_ttl_sweeper(timeout=10)
    memory.close()


def test_bad_input_is_refused_and_changes_nothing(memory):
    memory.put(USER, "k", {"text": "kept"})
    with pytest.raises(TypeError, match="not plain JSON"):
        memory.put(USER, "k", {"text": object()})
    with pytest.raises(TypeError, match="read back"):
        memory.put(USER, "k", {"text": ("a", "tuple")})
    with pytest.raises(InvalidNamespaceError):
        memory.put(("langgraph",), "k", {"text": "reserved root"})
    with pytest.raises(InvalidNamespaceError):
        memory.put(("a.b",), "k", {"text": "dotted label"})
    assert memory.get(USER, "k").value == {"text": "kept"}
    with pytest.raises(ValueError, match="embed"):
        ICAEMemory(memory.pipeline, index={"embed": "openai:text-embedding-3-small"})
    with pytest.raises(TypeError, match="chat_history"):
        ICAEMemory(memory.pipeline, ("tenant", "agent", "thread"))
    with pytest.raises(TypeError, match="MemoryPipeline"):
        ICAEMemory("memory/")


def test_views_share_the_store(memory):
    memory.put(USER, "fact", {"text": "Paris is the capital of France"})
    (document,) = memory.as_retriever(USER, k=1).invoke("capital")
    assert document.metadata["document_id"] == "fact"
    memory.as_vectorstore(("docs",)).add_texts(["Berlin is in Germany"], ids=["berlin"])
    assert memory.get(("docs",), "berlin").value["page_content"] == "Berlin is in Germany"
    history = memory.chat_history(("chats", "t1"))
    assert history.messages == []


def test_an_event_loop_can_drive_it_concurrently(memory):
    async def main() -> list:
        await asyncio.gather(*(memory.aput(USER, f"k{i}", {"text": f"n {i}"}) for i in range(4)))
        return await asyncio.gather(*(memory.aget(USER, f"k{i}") for i in range(4)))

    assert [item.value["text"] for item in asyncio.run(main())] == [f"n {i}" for i in range(4)]


@pytest.mark.parametrize("ttl", [-5, -0.001, float("nan"), "10", True])
def test_a_ttl_that_is_not_minutes_is_refused(memory, ttl):
    with pytest.raises(ValueError, match="minutes >= 0"):
        memory.put(USER, "k", {"text": "x"}, ttl=ttl)
    assert memory.get(USER, "k") is None  # nothing was written


def test_a_negative_default_ttl_is_refused(tmp_path):
    with pytest.raises(ValueError, match="default_ttl is -5"):
        ICAEMemory(fresh_pipeline(tmp_path / "store"), ttl={"default_ttl": -5})


def test_repeated_reads_of_items_with_a_ttl_write_once(tmp_path):
    """refresh_on_read writes an expiry only when it moves by 1% of the TTL: an agent that
    searches the same items every turn does not turn each search into a write transaction."""
    from sqlalchemy import event

    ttl = {"default_ttl": 60.0, "refresh_on_read": True}
    memory = ICAEMemory(fresh_pipeline(tmp_path / "store"), ttl=ttl)
    for i in range(5):
        memory.put(USER, f"k{i}", {"text": f"fact {i}", "n": i}, index=False)
    writes: list[str] = []

    def count_writes(_conn, _cursor, statement: str, *_args) -> None:
        if statement.lstrip().split(" ", 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            writes.append(statement)

    event.listen(memory.pipeline.store.engine, "after_cursor_execute", count_writes)
    for _ in range(10):
        assert len(memory.search(USER, limit=10)) == 5
        assert memory.search(USER, filter={"n": 3})[0].key == "k3"
        assert memory.get(USER, "k1").value["n"] == 1
    assert writes == []
    memory.close()


def test_a_search_pushes_back_the_expiry_of_the_items_it_returns_when_due(tmp_path):
    """A search judges whether an item's expiry is due to move on the item as it read it, and
    then writes the items that are due (and only them): an item found by a search that is
    older than 1% of its TTL has its expiry pushed back, one without a TTL never does."""
    ttl = {"default_ttl": 1.0, "refresh_on_read": True}
    memory = ICAEMemory(fresh_pipeline(tmp_path / "store"), ttl=ttl)
    memory.put(USER, "timed", {"n": 1}, index=False)
    memory.put(USER, "forever", {"n": 2}, index=False, ttl=None)

    def expiry(key: str) -> str | None:
        (document,) = memory.pipeline.get_documents([key], namespace=USER)
        return document.metadata["langgraph_item"]["expires_at"]

    before = expiry("timed")
    assert [item.key for item in memory.search(USER)] == ["timed", "forever"]
    assert expiry("timed") == before  # too soon to move by 1% of the TTL (0.6 s)
    time.sleep(0.65)
    assert [item.key for item in memory.search(USER, filter={"n": 1})] == ["timed"]
    assert expiry("timed") > before
    assert [item.key for item in memory.search(USER, refresh_ttl=True)] == ["timed", "forever"]
    assert expiry("forever") is None
    memory.close()
