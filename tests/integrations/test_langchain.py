"""LangChain classes: the standard suites from langchain-tests plus behaviour of our own."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
from chat_suite import ChatICAESuite
from icmem.integrations.langchain import ChatICAE, ICAEChatMessageHistory, ICAERetriever
from icmem.integrations.langchain.chat_model import _until_stop
from icmem.store import MemoryStore
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_tests.integration_tests import RetrieversIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests
from tiny_models import tiny_embedder, tiny_icae, tiny_tokenizer

from icmem.pipeline import NO_MEMORY_NOTICE, MemoryPipeline

NS = ("tenant", "agent", "thread")
DOCS = {
    "fox": "The quick brown fox jumps over the lazy dog. " * 6,
    "paris": "Paris is the capital of France; Berlin is the capital of Germany. " * 5,
}


@functools.cache
def shared_pipeline() -> MemoryPipeline:
    """One tiny pipeline with two documents, for the standard suites (which build many models)."""
    tokenizer = tiny_tokenizer()
    icae, embedder = tiny_icae(tokenizer), tiny_embedder(tokenizer)
    directory = Path(tempfile.mkdtemp(prefix="icmem-langchain-"))
    store = MemoryStore.open(directory, dim=embedder.dim, model_fingerprint=icae.fingerprint)
    pipeline = MemoryPipeline(icae, store, embedder)
    for key, text in DOCS.items():
        pipeline.ingest(text, namespace=NS, document_id=key)
    return pipeline


class TestChatICAEStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatICAE]:
        return ChatICAE

    @property
    def chat_model_params(self) -> dict:
        return {"pipeline": shared_pipeline(), "namespace": NS, "k": 2}

    @property
    def standard_chat_model_params(self) -> dict:
        params = dict(super().standard_chat_model_params)
        params.pop("api_key")  # a local model has no API key to accept
        return params


class TestICAERetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[ICAERetriever]:
        return ICAERetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"pipeline": shared_pipeline(), "namespace": NS}

    @property
    def retriever_query_example(self) -> str:
        return "capital of France"


def test_chat_answer_equals_decoding_from_recalled_slots():
    pipeline = shared_pipeline()
    chat = ChatICAE(pipeline=pipeline, namespace=NS, k=2, max_tokens=6)
    question = "What is the capital of France?"
    message = chat.invoke([SystemMessage("be brief"), HumanMessage(question)])
    recalled = pipeline.recall(question, namespace=NS, k=2)
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": question},
    ]
    assert message.content == pipeline.icae.generate(
        recalled.memory, conversation, max_new_tokens=6
    )
    sources = message.response_metadata["sources"]
    assert [s["span_id"] for s in sources] == [h.span_id for h in recalled.hits]
    assert message.response_metadata["memory"] == "slots"
    streamed = "".join(chunk.content for chunk in chat.stream(question))
    assert streamed == pipeline.icae.generate(recalled.memory, question, max_new_tokens=6)


def test_every_turn_of_the_conversation_reaches_the_decoder(monkeypatch):
    pipeline = shared_pipeline()
    seen = []
    real = pipeline.prompt_cache.generate

    def spy(icae, memory, conversation, max_new_tokens, sampling, constraint=None):
        seen.append((conversation, max_new_tokens))
        return real(icae, memory, conversation, max_new_tokens, sampling, constraint)

    monkeypatch.setattr(pipeline.prompt_cache, "generate", spy)
    chat = ChatICAE(pipeline=pipeline, namespace=NS, k=2, max_tokens=6)
    chat.invoke(
        [
            SystemMessage("You answer from memory."),
            HumanMessage("Where is Paris?"),
            AIMessage("In France."),
            HumanMessage("And Berlin?"),
        ],
        max_tokens=3,  # per call, over the constructor's 6
    )
    assert seen == [
        (
            [
                {"role": "system", "content": "You answer from memory."},
                {"role": "user", "content": "Where is Paris?"},
                {"role": "assistant", "content": "In France."},
                {"role": "user", "content": "And Berlin?"},
            ],
            3,
        )
    ]


def test_per_call_settings_and_usage():
    pipeline = shared_pipeline()
    chat = ChatICAE(pipeline=pipeline, namespace=NS, k=2, max_tokens=16)
    message = chat.invoke("What is the capital of France?", max_tokens=2, k=1)
    usage = message.usage_metadata
    assert usage["output_tokens"] == len(pipeline.token_ids(message.content)) <= 2
    slots = message.response_metadata["memory_slots"]
    assert len(message.response_metadata["sources"]) == 1 and slots > 0
    prompt = len(pipeline.icae.prompt_ids("What is the capital of France?"))
    assert usage["input_tokens"] == prompt + slots
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    with pytest.raises(TypeError, match="per call"):
        chat.invoke("hi", max_new_tokens=2)


def test_recall_that_finds_nothing_says_so_in_the_answer():
    pipeline = shared_pipeline()
    chat = ChatICAE(pipeline=pipeline, namespace=("nobody", "here", "yet"), max_tokens=5)
    base = pipeline.icae.generate([], "Where is Paris?", max_new_tokens=5)
    message = chat.invoke("Where is Paris?")
    assert message.response_metadata["memory"] == "none"
    assert message.response_metadata["sources"] == []
    assert message.content == NO_MEMORY_NOTICE + base
    streamed = "".join(c.text for c in chat.stream("Where is Paris?"))
    assert streamed == NO_MEMORY_NOTICE + base
    # Stop strings cut what the model wrote, never the notice; usage counts what it wrote.
    assert ";" in NO_MEMORY_NOTICE
    stopped = chat.invoke("Where is Paris?", stop=[";"])
    assert stopped.content.startswith(NO_MEMORY_NOTICE)
    written = len(pipeline.icae.tokenize(base))
    assert message.usage_metadata["output_tokens"] == written
    # A plain model was asked for: no recall, no notice.
    plain = ChatICAE(pipeline=pipeline, namespace=NS, memory="none", max_tokens=5)
    answer = plain.invoke("Where is Paris?")
    assert (answer.content, answer.response_metadata["memory"]) == (base, "none")


def test_configurable_fields_and_token_ids():
    from langchain_core.runnables import ConfigurableField

    pipeline = shared_pipeline()
    chat = ChatICAE(pipeline=pipeline, namespace=NS, k=2, max_tokens=16).configurable_fields(
        max_tokens=ConfigurableField(id="max_tokens")
    )
    short = chat.with_config(configurable={"max_tokens": 1}).invoke("Where is Paris?")
    assert short.usage_metadata["output_tokens"] <= 1
    plain = ChatICAE(pipeline=pipeline, namespace=NS)
    assert plain.get_token_ids("Paris is big") == pipeline.icae.tokenize("Paris is big")
    assert plain.get_num_tokens("Paris is big") == len(pipeline.icae.tokenize("Paris is big"))


def test_chat_model_is_not_serialisable():
    """The standard suite skips its serdes test for such models; say so explicitly here: a
    chat model holding a live pipeline (models and an open store) cannot be serialised."""
    chat = ChatICAE(pipeline=shared_pipeline(), namespace=NS)
    assert not chat.is_lc_serializable()


def test_chat_needs_a_human_message():
    chat = ChatICAE(pipeline=shared_pipeline(), namespace=NS)
    with pytest.raises(ValueError, match="human message"):
        chat.invoke([SystemMessage("no question here")])


def test_unknown_constructor_argument_is_refused():
    with pytest.raises(ValueError, match="extra"):
        ChatICAE(pipeline=shared_pipeline(), no_such_option=1)


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["hello ", "wor", "ld"], ["wor"], "hello "),
        (["ab", "cSTO", "P tail"], ["STOP"], "abc"),
        (["no stop ", "here"], ["zzz"], "no stop here"),
        (["ST", "ART"], ["STOP"], "START"),
    ],
)
def test_stop_strings_cut_the_stream(pieces, stops, expected):
    assert "".join(_until_stop(iter(pieces), stops, None)) == expected


def test_retriever_documents_carry_their_origin():
    retriever = ICAERetriever(pipeline=shared_pipeline(), namespace=NS, k=3)
    documents = retriever.invoke("capital of France")
    assert len(documents) == 3
    for doc in documents:
        assert doc.metadata["document_id"] in DOCS
        assert doc.page_content in DOCS[doc.metadata["document_id"]]


def test_memory_survives_a_restart(pipeline, tmp_path):
    history = ICAEChatMessageHistory(pipeline, NS)
    history.add_messages([HumanMessage("my name is Ada"), AIMessage("hello Ada")])
    history.add_message(HumanMessage("what is my name?"))
    pipeline.close()

    reopened_store = MemoryStore.open(tmp_path / "store", dim=pipeline.embedder.dim)
    reopened = MemoryPipeline(pipeline.icae, reopened_store, pipeline.embedder)
    restored = ICAEChatMessageHistory(reopened, NS)
    assert [(m.type, m.content) for m in restored.messages] == [
        ("human", "my name is Ada"),
        ("ai", "hello Ada"),
        ("human", "what is my name?"),
    ]
    hits = reopened.recall("my name is Ada", namespace=NS, k=3).hits
    assert {h.document_id for h in hits} == {d.id for d in reopened.store.list_documents(NS)}
    assert ICAEChatMessageHistory(reopened, ("tenant", "agent", "other")).messages == []
    restored.clear()
    assert restored.messages == []
    reopened.close()


def test_chat_reads_documents_a_retriever_found_without_searching_again(monkeypatch):
    from icmem.integrations.langchain import slot_rag_chain

    pipeline = shared_pipeline()
    retriever = ICAERetriever(pipeline=pipeline, namespace=NS, k=2)
    chat = ChatICAE(pipeline=pipeline, namespace=NS, max_tokens=5)
    question = "Which city is the capital of France?"
    documents = retriever.invoke(question)
    span_ids = [doc.metadata["span_id"] for doc in documents]
    expected = "".join(
        pipeline.reply(question, span_ids=span_ids, namespace=NS, max_new_tokens=5).pieces
    )

    def no_search(*args, **kwargs):
        raise AssertionError("the chat model searched again")

    monkeypatch.setattr(pipeline.store, "search", no_search)
    message = chat.invoke(question, documents=documents)
    assert message.content == expected
    in_memory_order = [h.span_id for h in pipeline.memory_of_spans(span_ids, namespace=NS).hits]
    assert sorted(in_memory_order) == sorted(span_ids)
    assert [s["span_id"] for s in message.response_metadata["sources"]] == in_memory_order
    monkeypatch.undo()
    chained = slot_rag_chain(retriever, chat).invoke(question)
    assert chained.content == expected


def test_documents_from_elsewhere_are_refused():
    from langchain_core.documents import Document

    chat = ChatICAE(pipeline=shared_pipeline(), namespace=NS, max_tokens=2)
    with pytest.raises(ValueError, match="ICAERetriever"):
        chat.invoke("hi", documents=[Document("some text")])


def test_spans_outside_the_namespace_are_not_read():
    from icmem.store import UnknownSpanError

    pipeline = shared_pipeline()
    span_id = pipeline.recall("fox", namespace=NS, k=1).hits[0].span_id
    assert pipeline.store.get_spans([span_id], namespace=NS)[0].span_id == span_id
    with pytest.raises(UnknownSpanError, match="another namespace"):
        pipeline.store.get_spans([span_id], namespace=("other", "agent", "thread"))
    with pytest.raises(UnknownSpanError):
        pipeline.store.get_spans([10**9], namespace=NS)


class TestChatICAEIntegration(ChatICAESuite):
    """The standard integration suite on the tiny model. Tool calls are forced (tool_choice
    "any"): a random tiny model never calls a tool unprompted, and neither reliably does a
    135M one; forced calls are decoded under the tools' schemas, so they always parse."""

    @property
    def chat_model_params(self) -> dict:
        # enough for a forced call to close (the tiny tokenizer spends a token per character)
        return {"pipeline": shared_pipeline(), "namespace": NS, "k": 1, "max_tokens": 96}

    # The standard suite also checks that the model reads argument values out of the question
    # (input=3, a Chinese greeting, a non-empty style) and answers after a tool result. A random
    # tiny model cannot; its forced calls still parse and fit the schemas (tested above). The
    # same tests on a capable base model are what they are for.
    _NEEDS_A_CAPABLE_MODEL = (
        "asserts argument values read from the question; the random tiny test model writes "
        "schema-valid but arbitrary ones"
    )

    @pytest.mark.xfail(reason=_NEEDS_A_CAPABLE_MODEL, strict=True)
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_tool_calling(self, model) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=_NEEDS_A_CAPABLE_MODEL, strict=True)
    async def test_tool_calling_async(self, model) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=_NEEDS_A_CAPABLE_MODEL, strict=True)
    def test_bind_runnables_as_tools(self, model) -> None:
        super().test_bind_runnables_as_tools(model)

    @pytest.mark.xfail(reason=_NEEDS_A_CAPABLE_MODEL, strict=True)
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason=_NEEDS_A_CAPABLE_MODEL, strict=True)
    def test_unicode_tool_call_integration(self, model) -> None:
        super().test_unicode_tool_call_integration(model)


def test_profile_says_what_the_model_can_do():
    profile = ChatICAE(pipeline=shared_pipeline()).profile
    assert profile["tool_calling"] and profile["structured_output"] and profile["tool_choice"]
    assert not profile["image_inputs"] and "max_input_tokens" not in profile
