"""ICAEVectorStore: langchain-tests' standard suite, plus what the suite does not cover (search
by filter, MMR, relevance scores, `from_texts`, and that documents are memory ChatICAE recalls)."""

from __future__ import annotations

import functools
import uuid

import numpy as np
import pytest
from icmem.integrations.langchain import (
    ICAEEmbeddings,
    ICAEVectorStore,
    LangChainEmbedder,
)
from icmem.integrations.langgraph import ICAEMemory
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_tests.integration_tests import VectorStoreIntegrationTests
from langgraph_fixtures import fresh_pipeline, tiny_models


@functools.cache
def fake_embedding_memory() -> ICAEMemory:
    """One store embedded with the suite's fake embeddings; each test takes a new namespace."""
    embedder = LangChainEmbedder(VectorStoreIntegrationTests.get_embeddings())
    return ICAEMemory(fresh_pipeline(embedder=embedder))


class TestICAEVectorStoreStandard(VectorStoreIntegrationTests):
    @pytest.fixture
    def vectorstore(self) -> ICAEVectorStore:
        return ICAEVectorStore(fake_embedding_memory(), namespace=("suite", uuid.uuid4().hex))


@pytest.fixture
def vectorstore() -> ICAEVectorStore:
    return ICAEMemory(fresh_pipeline()).as_vectorstore(("docs", "kb"))


FACTS = [
    ("paris", "Paris is the capital of France", {"lang": "en", "year": 2020}),
    ("berlin", "Berlin is the capital of Germany", {"lang": "de", "year": 2021}),
    ("fox", "The quick brown fox jumps over the lazy dog", {"lang": "en", "year": 2022}),
]


def _add_facts(vectorstore: ICAEVectorStore) -> None:
    ids, texts, metadatas = zip(*FACTS, strict=True)
    assert vectorstore.add_texts(list(texts), list(metadatas), ids=list(ids)) == list(ids)


def test_filter_and_scores(vectorstore):
    _add_facts(vectorstore)
    english = vectorstore.similarity_search("capital", k=3, filter={"lang": "en"})
    assert {doc.id for doc in english} == {"paris", "fox"}
    recent = vectorstore.similarity_search("capital", k=3, filter={"year": {"$gte": 2021}})
    assert {doc.id for doc in recent} == {"berlin", "fox"}
    scored = vectorstore.similarity_search_with_score("Paris is the capital of France", k=3)
    assert scored[0][0] == Document(id="paris", page_content=FACTS[0][1], metadata=FACTS[0][2])
    assert scored[0][1] == pytest.approx(1.0, abs=1e-5)  # the same text: cosine 1
    assert [s for _, s in scored] == sorted((s for _, s in scored), reverse=True)
    relevance = vectorstore.similarity_search_with_relevance_scores("Paris is the capital", k=3)
    assert all(0.0 <= r <= 1.0 for _, r in relevance)


def test_mmr_prefers_documents_unlike_the_ones_chosen(vectorstore):
    texts = ["Paris is the capital of France"] * 2 + ["The quick brown fox jumps"]
    vectorstore.add_texts(texts, ids=["a", "b", "c"])
    diverse = vectorstore.max_marginal_relevance_search(
        "Paris is the capital of France", k=2, fetch_k=3, lambda_mult=0.1
    )
    assert diverse[0].id in {"a", "b"} and diverse[1].id == "c"
    relevant = vectorstore.max_marginal_relevance_search(
        "Paris is the capital of France", k=2, fetch_k=3, lambda_mult=1.0
    )
    assert {doc.id for doc in relevant} == {"a", "b"}


def test_documents_are_store_items_and_recallable_memory(vectorstore):
    _add_facts(vectorstore)
    memory = vectorstore.memory
    item = memory.get(("docs", "kb"), "berlin")
    assert item.value == {"page_content": FACTS[1][1], "metadata": FACTS[1][2]}
    recalled = memory.pipeline.recall("capital of Germany", namespace=("docs", "kb"), k=3)
    assert {hit.document_id for hit in recalled.hits} == {"paris", "berlin", "fox"}
    assert all(m.num_slots > 0 for m in recalled.memory)


def test_from_texts_with_any_embeddings_survives_reopening(tmp_path):
    icae, _ = tiny_models()
    fake = DeterministicFakeEmbedding(size=8)
    opened = ICAEVectorStore.from_texts(
        ["alpha beta", "gamma delta"],
        fake,
        [{"n": 1}, {"n": 2}],
        ids=["one", "two"],
        store=tmp_path / "store",
        icae=icae,
    )
    opened.memory.close()
    again = ICAEMemory.open(tmp_path / "store", icae=icae, embedder=LangChainEmbedder(fake))
    vectorstore = again.as_vectorstore(("vectorstore", "default"))
    assert vectorstore.get_by_ids(["two", "missing", "one"]) == [
        Document(id="two", page_content="gamma delta", metadata={"n": 2}),
        Document(id="one", page_content="alpha beta", metadata={"n": 1}),
    ]
    assert vectorstore.similarity_search("gamma delta", k=1)[0].id == "two"
    again.close()
    with pytest.raises(ValueError, match="store="):
        ICAEVectorStore.from_texts(["x"], fake)


def test_embeddings_adapters_agree_with_the_embedder():
    _, embedder = tiny_models()
    embeddings = ICAEEmbeddings(embedder)
    texts = ["Paris is big", "a fox"]
    assert np.allclose(embeddings.embed_documents(texts), embedder.embed(texts))
    assert np.allclose(embeddings.embed_query("a fox"), embedder.embed(["a fox"])[0])
    wrapped = LangChainEmbedder(DeterministicFakeEmbedding(size=5))
    vectors = wrapped.embed(texts)
    assert wrapped.dim == 5 and vectors.shape == (2, 5)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    with pytest.raises(TypeError, match="Embeddings"):
        LangChainEmbedder(embedder)
    with pytest.raises(TypeError, match="ICAEMemory"):
        ICAEVectorStore(embedder)


def test_mismatched_ids_are_refused_and_nothing_is_written(vectorstore):
    with pytest.raises(ValueError, match="one of each"):
        vectorstore.add_texts(["a", "b"], ids=["only-one"])
    assert vectorstore.get_by_ids(["only-one"]) == []
