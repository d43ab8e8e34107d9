"""Agents built with `create_agent(model, store=ICAEMemory(...), middleware=[...])`: memories
written in one process answer in the next, only for the user who gave them; ChatICAE gets them
as slots; the memory tools act in the caller's namespace only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from agent_session import EchoSystemPrompt, answers
from icmem.integrations.langchain import ChatICAE
from icmem.integrations.langgraph import (
    ICAEMemory,
    ICAEMemoryMiddleware,
    MemoryContext,
    make_memory_tools,
)
from icmem.integrations.langgraph.middleware import MEMORY_HEADER
from langchain.agents import create_agent
from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.graph import START, MessagesState, StateGraph
from langgraph_fixtures import fresh_pipeline

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _session(store: Path, user: str, *messages: str) -> list[str]:
    """Run an agent session in a process of its own (a real restart in between)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
        ),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, str(HERE / "agent_session.py"), str(store), user, *messages],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_memories_outlive_the_process_and_stay_with_their_user(tmp_path):
    store = tmp_path / "store"
    # Alice talks to the agent in another process, which then exits.
    assert _session(store, "alice", "My favourite colour is teal.") == ["(nothing)"]
    with ICAEMemory(fresh_pipeline(store)) as memory:
        answers(memory, "bob", ["My favourite colour is crimson."])
        (alice,) = answers(memory, "alice", ["What is my favourite colour?"])
        (bob,) = answers(memory, "bob", ["What is my favourite colour?"])
        (carol,) = answers(memory, "carol", ["What is my favourite colour?"])
        assert alice.startswith(MEMORY_HEADER) and "teal" in alice and "crimson" not in alice
        assert "crimson" in bob and "teal" not in bob
        assert carol == "(nothing)"
        turns = memory.search(("memories", "alice"))
        # What the user said; the model's replies are not stored unless asked for.
        assert [t.value["text"] for t in turns] == [
            "user: My favourite colour is teal.",
            "user: What is my favourite colour?",
        ]
        assert {ns[1] for ns in memory.list_namespaces(prefix=("memories",))} == {
            "alice",
            "bob",
            "carol",
        }


def test_chat_icae_gets_the_users_memory_as_slots(tmp_path):
    memory = ICAEMemory(fresh_pipeline(tmp_path / "store"))
    alice, bob = ("memories", "alice"), ("memories", "bob")
    memory.put(alice, "colour", {"text": "Alice's favourite colour is teal."})
    memory.put(bob, "colour", {"text": "Bob's favourite colour is crimson."})
    chat = ChatICAE(pipeline=memory.pipeline, max_tokens=3)
    agent = create_agent(
        chat,
        store=memory,
        middleware=[ICAEMemoryMiddleware(write=False)],
        context_schema=MemoryContext,
    )
    question = "What is my favourite colour?"
    state = agent.invoke({"messages": [HumanMessage(question)]}, context={"user_id": "alice"})
    reply = state["messages"][-1]
    assert reply.response_metadata["memory"] == "slots"
    recalled = memory.pipeline.recall(question, namespace=alice, k=4)
    assert [s["span_id"] for s in reply.response_metadata["sources"]] == [
        h.span_id for h in recalled.hits
    ]
    assert {s["document_id"] for s in reply.response_metadata["sources"]} == {"colour"}
    assert reply.response_metadata["memory_slots"] == sum(m.num_slots for m in recalled.memory)
    memory.close()


def test_memory_tools_remember_recall_and_forget_per_user(tmp_path):
    memory = ICAEMemory(fresh_pipeline(tmp_path / "store"))
    tools = make_memory_tools()  # the agent's store, from the tool runtime
    assert [t.name for t in tools] == ["remember", "recall", "forget"]
    script = [
        AIMessage("", tool_calls=[_call("remember", content="Alice owns a red bicycle")]),
        AIMessage("noted"),
    ]
    agent = create_agent(_scripted(script), tools=tools, store=memory, context_schema=MemoryContext)
    agent.invoke({"messages": [HumanMessage("remember my bike")]}, context={"user_id": "alice"})
    (item,) = memory.search(("memories", "alice"))
    assert item.value == {"text": "Alice owns a red bicycle"}

    script = [
        AIMessage("", tool_calls=[_call("recall", query="bicycle")]),
        AIMessage("", tool_calls=[_call("forget", memory_id=item.key, n=2)]),
        AIMessage("done"),
    ]
    agent = create_agent(_scripted(script), tools=tools, store=memory, context_schema=MemoryContext)
    as_bob = agent.invoke({"messages": [HumanMessage("bike?")]}, context={"user_id": "bob"})
    results = [m.text for m in as_bob["messages"] if m.type == "tool"]
    assert results[0] == "no memories found"
    assert results[1].startswith(f"refused: {item.key!r} is not the id of one of your memories")
    assert memory.get(("memories", "alice"), item.key) is not None  # bob cannot forget it

    script[1] = AIMessage("", tool_calls=[_call("forget", memory_id=item.key, n=3)])
    agent = create_agent(_scripted(script), tools=tools, store=memory, context_schema=MemoryContext)
    as_alice = agent.invoke({"messages": [HumanMessage("bike?")]}, context={"user_id": "alice"})
    results = [m.text for m in as_alice["messages"] if m.type == "tool"]
    assert results == [f"{item.key}: Alice owns a red bicycle", f"forgot {item.key}"]
    assert memory.search(("memories", "alice")) == []
    memory.close()


def test_a_run_without_a_user_is_refused(tmp_path):
    memory = ICAEMemory(fresh_pipeline(tmp_path / "store"))
    agent = create_agent(
        EchoSystemPrompt(),
        store=memory,
        middleware=[ICAEMemoryMiddleware()],
        context_schema=MemoryContext,
    )
    with pytest.raises(ValueError, match="user_id"):
        agent.invoke({"messages": [HumanMessage("hi")]})
    assert memory.list_namespaces() == []
    memory.close()


def test_a_graph_compiled_with_the_store_reads_and_writes_it(tmp_path):
    """The issue's first failure: compile(store=ICAEMemory(...)) and use it inside a node."""
    memory = ICAEMemory(fresh_pipeline(tmp_path / "store"))

    def node(state: MessagesState, *, store) -> dict:
        store.put(("notes",), "last", {"text": state["messages"][-1].text})
        return {"messages": [AIMessage(store.get(("notes",), "last").value["text"].upper())]}

    graph = StateGraph(MessagesState).add_node("node", node).add_edge(START, "node")
    state = graph.compile(store=memory).invoke({"messages": [HumanMessage("hello")]})
    assert state["messages"][-1].text == "HELLO"
    assert memory.get(("notes",), "last").value == {"text": "hello"}
    memory.close()


def _call(name: str, n: int = 1, **args: str) -> dict:
    return {"name": name, "args": args, "id": f"call-{name}-{n}", "type": "tool_call"}


def _scripted(messages: list[AIMessage]) -> GenericFakeChatModel:
    class Scripted(GenericFakeChatModel):
        def bind_tools(self, tools, **kwargs):
            return self

    return Scripted(messages=iter(messages))
