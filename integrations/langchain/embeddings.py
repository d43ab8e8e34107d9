"""Embeddings both ways: icmem's embedder as a LangChain `Embeddings`, and any LangChain
`Embeddings` as the embedder a `MemoryPipeline` stores and searches with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from langchain_core.embeddings import Embeddings


class ICAEEmbeddings(Embeddings):
    """icmem's sentence embedder (all-MiniLM-L6-v2 by default, offline) as LangChain
    `Embeddings`; also takes a `MemoryPipeline`, to embed exactly as its store does."""

    def __init__(self, embedder: Any = None) -> None:
        if embedder is None:
            from icmem.embedding import TextEmbedder

            embedder = TextEmbedder.load()
        if not callable(getattr(embedder, "embed", None)):
            raise TypeError(
                "ICAEEmbeddings takes an icmem TextEmbedder or a MemoryPipeline (anything with "
                f"embed(texts)), got {type(embedder).__name__}"
            )
        self.embedder = embedder

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        return np.asarray(self.embedder.embed(list(texts)), dtype=np.float32).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


class LangChainEmbedder:
    """A LangChain `Embeddings` as a pipeline embedder: `MemoryPipeline.open(path,
    embedder=LangChainEmbedder(embeddings))`.

    Vectors are L2-normalised, so the store's inner product ranks by cosine similarity, as
    LangGraph's and most LangChain stores do. `dim` is probed once when not given.
    """

    def __init__(self, embeddings: Embeddings, *, dim: int | None = None) -> None:
        if not isinstance(embeddings, Embeddings):
            raise TypeError(
                f"LangChainEmbedder takes a LangChain Embeddings, got {type(embeddings).__name__}"
            )
        self.embeddings = embeddings
        self._dim = dim

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = len(self.embeddings.embed_query("dimension probe"))
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.empty((0, self.dim), np.float32)
        vectors = np.asarray(self.embeddings.embed_documents(texts), dtype=np.float32)
        if vectors.shape != (len(texts), self.dim):
            raise ValueError(
                f"the embeddings returned shape {vectors.shape} for {len(texts)} texts; "
                f"expected ({len(texts)}, {self.dim})"
            )
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms == 0, 1.0, norms)
