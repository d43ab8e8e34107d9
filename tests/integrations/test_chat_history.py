"""ICAEChatMessageHistory: no message is ever overwritten (delete-then-add, two writers at once),
histories never mix through namespace prefixes, and the async methods read what sync wrote."""

from __future__ import annotations

import threading

import pytest
from icmem.integrations.langchain import ICAEChatMessageHistory
from icmem.integrations.langgraph import ICAEMemory
from icmem.store import DocumentRecord
from langchain_core.messages import AIMessage, HumanMessage, message_to_dict
from langgraph_fixtures import fresh_pipeline

NS = ("acme", "bot", "thread-1")


@pytest.fixture
def pipeline():
    opened = fresh_pipeline()
    yield opened
    opened.close()


def _texts(history: ICAEChatMessageHistory) -> list[str]:
    return [m.content for m in history.messages]


def test_delete_then_add_overwrites_nothing(pipeline):
    history = ICAEChatMessageHistory(pipeline, NS)
    history.add_messages([HumanMessage("one"), AIMessage("two"), HumanMessage("three")])
    first = pipeline.list_documents(NS, exact=True)[0].id
    pipeline.delete_documents([first], namespace=NS)
    history.add_message(HumanMessage("four"))
    assert _texts(history) == ["two", "three", "four"]


def test_two_concurrent_writers_lose_nothing(pipeline):
    writers = [ICAEChatMessageHistory(pipeline, NS) for _ in range(2)]
    start = threading.Barrier(2)

    def write(name: str, history: ICAEChatMessageHistory) -> None:
        start.wait()
        for i in range(5):
            history.add_message(HumanMessage(f"{name}-{i}"))

    threads = [
        threading.Thread(target=write, args=(name, history))
        for name, history in zip("ab", writers, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    texts = _texts(ICAEChatMessageHistory(pipeline, NS))
    assert sorted(texts) == sorted(f"{n}-{i}" for n in "ab" for i in range(5))
    for name in "ab":  # each writer's messages keep their order
        assert [t for t in texts if t.startswith(name)] == [f"{name}-{i}" for i in range(5)]


def test_prefix_namespaces_are_refused(pipeline):
    ICAEChatMessageHistory(pipeline, NS).add_message(HumanMessage("hello"))
    with pytest.raises(ValueError, match="below it"):
        ICAEChatMessageHistory(pipeline, ("acme", "bot"))
    parent = ("acme", "bot2")
    ICAEChatMessageHistory(pipeline, parent).add_message(HumanMessage("parent"))
    with pytest.raises(ValueError, match="holds a chat history"):
        ICAEChatMessageHistory(pipeline, (*parent, "child"))
    assert _texts(ICAEChatMessageHistory(pipeline, NS)) == ["hello"]


def test_histories_written_with_counted_ids_still_read_in_order(pipeline):
    """Stores written before time-ordered ids hold msg-<count> documents with a "seq"."""
    legacy = ICAEChatMessageHistory(pipeline, NS)
    old = [HumanMessage("old zero"), AIMessage("old one")]
    pipeline.store.upsert(
        [
            DocumentRecord(
                spans=[],
                id=f"msg-{seq:09d}",
                metadata={"seq": seq, "message": message_to_dict(message)},
            )
            for seq, message in reversed(list(enumerate(old)))
        ],
        namespace=NS,
    )
    legacy.add_message(HumanMessage("new"))
    assert _texts(legacy) == ["old zero", "old one", "new"]


async def test_async_methods(pipeline):
    history = ICAEMemory(pipeline).chat_history(NS)
    await history.aadd_messages([HumanMessage("hi"), AIMessage("hello")])
    assert [m.content for m in await history.aget_messages()] == ["hi", "hello"]
    await history.aclear()
    assert await history.aget_messages() == []


def test_messages_are_recallable_memory(pipeline):
    history = ICAEChatMessageHistory(pipeline, NS)
    history.add_messages([HumanMessage("my name is Ada"), AIMessage("hello Ada")])
    recalled = pipeline.recall("my name is Ada", namespace=NS, k=2)
    stored = {d.id for d in pipeline.list_documents(NS, exact=True)}
    assert {hit.document_id for hit in recalled.hits} == stored
    assert recalled.hits[0].text == "human: my name is Ada"
