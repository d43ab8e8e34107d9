"""Issue 23's agent cases: no silent nonsense from ChatICAE, a middleware that respects the
model's settings and remembers what the user said (not every reply), memory tools that refuse
ids that name nothing, and integrations that import with only the packages they need."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from icmem.integrations.langchain import ChatICAE
from icmem.integrations.langgraph import (
    ICAEMemory,
    ICAEMemoryMiddleware,
    MemoryContext,
    make_memory_tools,
)
from icmem.store.errors import InvalidRecordError
from icmem.store.namespaces import validate_namespace
from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph_fixtures import fresh_pipeline

from icmem.errors import ConversationError

HERE = Path(__file__).parent
# A library is quiet: pydantic's serialisation warnings (the memory tools once raised one per
# call) fail these tests.
pytestmark = pytest.mark.filterwarnings("error:Pydantic serializer warnings:UserWarning")
ALICE = ("memories", "alice")


@pytest.fixture
def memory(tmp_path):
    opened = ICAEMemory(fresh_pipeline(tmp_path / "store"))
    yield opened
    opened.close()


# ---------------------------------------------------------------- ChatICAE: one namespace rule


def test_a_string_namespace_gets_the_stores_error_not_pydantics(memory):
    with pytest.raises(InvalidRecordError) as raised:
        ChatICAE(pipeline=memory.pipeline, namespace="a/b")
    with pytest.raises(InvalidRecordError) as direct:
        validate_namespace("a/b")
    assert str(raised.value) == str(direct.value)  # one rule, one message
    # A list is accepted wherever a tuple is, and stored as one.
    assert ChatICAE(pipeline=memory.pipeline, namespace=["a", "b"]).namespace == ("a", "b")
    # A per-call namespace is checked by the same rule, never split into one-letter labels.
    chat = ChatICAE(pipeline=memory.pipeline, max_tokens=1)
    with pytest.raises(InvalidRecordError, match="non-empty string labels"):
        chat.invoke("hi", namespace="a/b")
    # The retriever, vector store and chat history by the same rule (a string was split into
    # one-letter labels by two of them).
    from icmem.integrations.langchain import (
        ICAEChatMessageHistory,
        ICAERetriever,
        ICAEVectorStore,
    )

    for make in (
        lambda: ICAERetriever(pipeline=memory.pipeline, namespace="a/b"),
        lambda: ICAEVectorStore(memory, namespace="a/b"),
        lambda: ICAEChatMessageHistory(memory.pipeline, "a/b"),
    ):
        with pytest.raises(InvalidRecordError) as refused:
            make()
        assert str(refused.value) == str(direct.value)


# ---------------------------------------------------------------- ChatICAE: unreadable content


@pytest.mark.parametrize(
    ("block", "named"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "image_url"),
        ({"type": "image", "base64": "AAAA", "mime_type": "image/png"}, "image"),
        ({"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}, "audio"),
        ({"type": "file", "base64": "AAAA", "mime_type": "application/pdf"}, "file"),
    ],
)
def test_content_the_model_cannot_read_is_refused_by_name(memory, block, named):
    chat = ChatICAE(pipeline=memory.pipeline, max_tokens=1)
    message = HumanMessage(content=[{"type": "text", "text": "What is in this?"}, block])
    with pytest.raises(ConversationError, match=rf"holds {named} content.*reads text only"):
        chat.invoke([message])
    earlier = [message, AIMessage("A photo."), HumanMessage("And now?")]
    with pytest.raises(ConversationError, match=named):
        chat.invoke(earlier)  # anywhere in the conversation, not only the last message


def test_a_chat_history_refuses_content_it_would_drop(memory):
    from icmem.integrations.langchain import ICAEChatMessageHistory

    history = ICAEChatMessageHistory(memory.pipeline, ("history", "t1"))
    photo = {"type": "image", "url": "https://example.com/cat.png"}
    with pytest.raises(ConversationError, match="holds image content"):
        history.add_messages([HumanMessage("hi"), HumanMessage(content=["Look:", photo])])
    assert history.messages == []  # nothing of the batch was stored


def test_text_blocks_and_an_ai_turns_own_call_blocks_are_read(memory):
    chat = ChatICAE(pipeline=memory.pipeline, max_tokens=1)
    question = HumanMessage(content=[{"type": "text", "text": "Where"}, " is Paris?"])
    call = {"type": "tool_use", "id": "t1", "name": "look", "input": {}}
    turn = AIMessage(content=[{"type": "text", "text": "Looking."}, call])
    assert isinstance(chat.invoke([question, turn, HumanMessage("So?")]), AIMessage)


# ---------------------------------------------------------------- middleware


class Recorder(BaseChatModel):
    """Answers with scripted replies carrying the given response metadata."""

    replies: list[tuple[str, dict[str, Any]]]

    @property
    def _llm_type(self) -> str:
        return "recorder"

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        text, metadata = self.replies.pop(0)
        reply = AIMessage(text, response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=reply)])

    def bind_tools(self, tools: Any, **kwargs: Any) -> Recorder:
        return self


def _run(model: BaseChatModel, memory: ICAEMemory, text: str, **options: Any) -> dict:
    agent = create_agent(
        model,
        store=memory,
        middleware=[ICAEMemoryMiddleware(**options)],
        context_schema=MemoryContext,
    )
    return agent.invoke({"messages": [HumanMessage(text)]}, context={"user_id": "alice"})


def test_the_middleware_respects_chat_icaes_memory_setting(memory):
    memory.put(ALICE, "colour", {"text": "Alice's favourite colour is teal."})
    for form in ("text", "slots"):
        chat = ChatICAE(pipeline=memory.pipeline, max_tokens=2, memory=form)
        state = _run(chat, memory, "What is my favourite colour?", write=False)
        metadata = state["messages"][-1].response_metadata
        assert metadata["memory"] == form
        assert {s["document_id"] for s in metadata["sources"]} == {"colour"}


def test_the_middleware_remembers_the_user_not_the_models_replies(memory):
    model = Recorder(replies=[("I'm so glad you're happy with me.", {})])
    _run(model, memory, "My cat is called Miso.")
    (item,) = memory.search(ALICE)
    assert item.value["text"] == "user: My cat is called Miso."


def test_asked_to_remember_replies_it_still_skips_empty_and_looping_ones(memory):
    replies = [
        ("Miso is a fine name.", {}),
        ("   ", {}),
        ("I'm so glad. I'm so glad. I'm so glad.", {"finish_reason": "repetition"}),
    ]
    model = Recorder(replies=replies)
    for text in ("My cat is called Miso.", "Say nothing.", "Are you glad?"):
        _run(model, memory, text, remember_replies=True)
    stored = sorted(item.value["text"] for item in memory.search(ALICE))
    assert stored == [
        "user: Are you glad?",
        "user: My cat is called Miso.\nassistant: Miso is a fine name.",
        "user: Say nothing.",
    ]


def test_the_middleware_remembers_what_tools_returned_but_not_memory_tools(memory):
    from langchain.tools import tool

    @tool
    def weather(city: str) -> str:
        """The weather in a city."""
        return f"Sunny in {city}."

    script = [
        AIMessage("", tool_calls=[_call("weather", city="Lisbon")]),
        AIMessage("", tool_calls=[_call("recall", query="cat")]),
        AIMessage("It is sunny."),
    ]
    agent = create_agent(
        _scripted(script),
        tools=[weather, *make_memory_tools()],
        store=memory,
        middleware=[ICAEMemoryMiddleware()],
        context_schema=MemoryContext,
    )
    agent.invoke({"messages": [HumanMessage("Weather in Lisbon?")]}, context={"user_id": "alice"})
    (item,) = memory.search(ALICE)
    assert item.value["text"] == "user: Weather in Lisbon?\ntool weather: Sunny in Lisbon."


# ---------------------------------------------------------------- memory tools


@pytest.mark.parametrize("bad_id", [");", "", "memory-" + "x" * 300, "memory-a\x00b", "colour"])
def test_forget_refuses_ids_that_name_no_memory_and_deletes_nothing(memory, bad_id):
    memory.put(ALICE, "colour", {"text": "teal"})
    memory.put(ALICE, "memory-1f", {"text": "a red bicycle"})
    script = [AIMessage("", tool_calls=[_call("forget", memory_id=bad_id)]), AIMessage("ok")]
    agent = create_agent(
        _scripted(script), tools=make_memory_tools(), store=memory, context_schema=MemoryContext
    )
    state = agent.invoke({"messages": [HumanMessage("forget")]}, context={"user_id": "alice"})
    (result,) = [m.text for m in state["messages"] if m.type == "tool"]
    assert result.startswith(f"refused: {bad_id!r} is not the id of one of your memories")
    assert sorted(item.key for item in memory.search(ALICE)) == ["colour", "memory-1f"]


# ---------------------------------------------------------------- install and output


def _python(code: str) -> subprocess.CompletedProcess:
    path = [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
    # A fresh user's process: without the settings `icmem` commands run in this one have made.
    made = ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY")
    env = {k: v for k, v in os.environ.items() if not k.startswith(made)}
    env["PYTHONPATH"] = os.pathsep.join(path)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_chat_icae_imports_with_only_langchain_core():
    code = """
import sys
sys.modules["langchain"] = sys.modules["langgraph"] = None  # as if not installed
from icmem.integrations.langchain import ChatICAE, ICAERetriever
try:
    from icmem.integrations.langchain import ICAEMemory
except ModuleNotFoundError as error:
    print(error)
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = 'ICAEMemory needs the langgraph package, which is not installed: pip install "icmem['
    assert expected in done.stdout


def test_loading_models_is_quiet_unless_asked(tmp_path):
    def load(asked: bool) -> subprocess.CompletedProcess:
        return _python(f"""
import logging
from tiny_models import tiny_icae, tiny_tokenizer
from transformers.utils import logging as hf_logging
if {asked}:
    logging.basicConfig(level=logging.INFO)
icae = tiny_icae(tiny_tokenizer())  # peft's adapters: a transformers deprecation inside
hf_logging.disable_progress_bar()  # the test's own writing bar
icae.model.get_base_model().save_pretrained({str(tmp_path)!r})
icae.tokenizer.save_pretrained({str(tmp_path)!r})
hf_logging.enable_progress_bar()
import icmem
icmem.load_model({str(tmp_path)!r})
icae.generate([], "Hello", max_new_tokens=2)  # transformers deprecates its own cache argument
print("loaded")
""")

    quiet = load(asked=False)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "loaded\n", "")
    told = load(asked=True)
    assert "Loading weights" in told.stderr  # asked for: the libraries speak again
    assert told.stdout == "loaded\n"


def _call(name: str, **args: str) -> dict:
    return {"name": name, "args": args, "id": f"call-{name}", "type": "tool_call"}


def _scripted(messages: list[AIMessage]) -> GenericFakeChatModel:
    class Scripted(GenericFakeChatModel):
        def bind_tools(self, tools, **kwargs):
            return self

    return Scripted(messages=iter(messages))
