"""A LangChain `VectorStore` over an `ICAEMemory`: each document is one store item.

A document is kept as the item `{"page_content": ..., "metadata": {...}}` under the vector
store's namespace, keyed by its id; its text is compressed into memory slots like any other
item, so `ChatICAE` recalls what a RAG chain retrieves. Give a vector store a namespace of its
own: searches cover that namespace and any below it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from icmem.store.namespaces import validate_namespace
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore
from langchain_core.vectorstores.utils import maximal_marginal_relevance

from .embeddings import ICAEEmbeddings, LangChainEmbedder

if TYPE_CHECKING:
    from icmem.integrations.langgraph import ICAEMemory
    from langgraph.store.base import SearchItem

DEFAULT_VECTORSTORE_NAMESPACE = ("vectorstore", "default")
_INDEXED = ["page_content"]


class ICAEVectorStore(VectorStore):
    """Documents in an icmem store, found by similarity to a query (cosine for normalised
    embeddings, as icmem's and `LangChainEmbedder`'s are)."""

    def __init__(
        self,
        memory: ICAEMemory,
        *,
        namespace: Sequence[str] = DEFAULT_VECTORSTORE_NAMESPACE,
    ) -> None:
        from icmem.integrations.langgraph import ICAEMemory

        if not isinstance(memory, ICAEMemory):
            raise TypeError(
                f"ICAEVectorStore takes an ICAEMemory, got {type(memory).__name__}; build one "
                "with ICAEMemory(pipeline) or ICAEVectorStore.from_texts(..., store=path)"
            )
        self.memory = memory
        self.namespace = validate_namespace(namespace)
        self._embeddings = ICAEEmbeddings(memory.pipeline)

    @property
    def embeddings(self) -> Embeddings:
        """The pipeline's embedder, as LangChain `Embeddings`."""
        return self._embeddings

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings | None = None,
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        store: str | os.PathLike[str] | None = None,
        namespace: Sequence[str] = DEFAULT_VECTORSTORE_NAMESPACE,
        **pipeline_options: Any,
    ) -> ICAEVectorStore:
        """Open (or create) the store at `store` (a directory or URL) with `embedding` as its
        embedder (default: icmem's MiniLM) and add the texts."""
        from icmem.integrations.langgraph import ICAEMemory

        if store is None:
            raise ValueError(
                "ICAEVectorStore.from_texts needs store=<directory or database URL> to keep "
                "the documents in"
            )
        if embedding is not None:
            pipeline_options["embedder"] = LangChainEmbedder(embedding)
        vectorstore = cls(
            ICAEMemory.open(store, create=True, **pipeline_options), namespace=namespace
        )
        vectorstore.add_texts(texts, metadatas, ids=ids)
        return vectorstore

    # ------------------------------------------------------------------ writes and reads

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Add (or, for an id already stored, replace) texts; returns their ids."""
        texts = list(texts)
        metadatas = list(metadatas) if metadatas is not None else [{} for _ in texts]
        ids = [i or uuid.uuid4().hex for i in ids] if ids else [uuid.uuid4().hex for _ in texts]
        if not len(texts) == len(metadatas) == len(ids):
            raise ValueError(
                f"got {len(texts)} texts, {len(metadatas)} metadatas and {len(ids)} ids; give "
                "one of each per text"
            )
        from langgraph.store.base import PutOp

        self.memory.batch(
            [
                PutOp(
                    self.namespace,
                    key,
                    {"page_content": text, "metadata": dict(metadata or {})},
                    index=_INDEXED,
                )
                for text, metadata, key in zip(texts, metadatas, ids, strict=True)
            ]
        )
        return ids

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """Delete documents by id (unknown ids are ignored), or every document with no ids."""
        from langgraph.store.base import PutOp

        if ids is None:
            self.memory.pipeline.delete_documents(namespace=self.namespace)
        else:
            self.memory.batch([PutOp(self.namespace, key, None) for key in ids])
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The stored documents with these ids, in the order asked; unknown ids left out."""
        from langgraph.store.base import GetOp

        items = self.memory.batch([GetOp(self.namespace, key) for key in ids])
        return [_document(item) for item in items if item is not None]

    # ------------------------------------------------------------------ search

    def similarity_search(
        self, query: str, k: int = 4, filter: dict[str, Any] | None = None, **kwargs: Any
    ) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter=filter)]

    def similarity_search_with_score(
        self, query: str, k: int = 4, filter: dict[str, Any] | None = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        vector = self.embeddings.embed_query(query)
        return self._scored(self._search(vector, k, filter))

    def similarity_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        filter: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        return [doc for doc, _ in self._scored(self._search(embedding, k, filter))]

    def max_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        vector = self.embeddings.embed_query(query)
        return self.max_marginal_relevance_search_by_vector(
            vector, k, fetch_k, lambda_mult, filter=filter
        )

    def max_marginal_relevance_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        """The `k` of the `fetch_k` nearest documents that are both relevant and unlike one
        another (`lambda_mult` 1: relevance only, 0: diversity only)."""
        candidates = [_document(item) for item in self._search(embedding, fetch_k, filter)]
        if not candidates:
            return []
        vectors = self.embeddings.embed_documents([doc.page_content for doc in candidates])
        chosen = maximal_marginal_relevance(
            np.asarray(embedding, dtype=np.float32),
            vectors,
            k=min(k, len(candidates)),
            lambda_mult=lambda_mult,
        )
        return [candidates[i] for i in chosen]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return self._cosine_relevance_score_fn

    def _search(
        self, vector: Sequence[float], k: int, filter: dict[str, Any] | None
    ) -> list[SearchItem]:
        scoped = {"metadata": filter} if filter else None
        return self.memory.search_by_vector(self.namespace, vector, filter=scoped, limit=k)

    @staticmethod
    def _scored(items: list[SearchItem]) -> list[tuple[Document, float]]:
        return [(_document(item), float(item.score or 0.0)) for item in items]


def _document(item: Any) -> Document:
    return Document(
        id=item.key,
        page_content=item.value["page_content"],
        metadata=dict(item.value.get("metadata") or {}),
    )
