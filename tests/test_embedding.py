"""Retrieval embeddings: unit vectors, independent of batching, and meaningful on real text."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import tiny_embedder

from icmem.embedding import TextEmbedder
from icmem.errors import ModelLoadError


@pytest.fixture
def embedder(tokenizer) -> TextEmbedder:
    return tiny_embedder(tokenizer)


def test_vectors_are_unit_length_and_padding_free(embedder):
    texts = ["short", "a much longer text about the quick brown fox and the lazy dog"]
    together = embedder.embed(texts)
    apart = np.concatenate([embedder.embed([t]) for t in texts])
    assert together.shape == (2, embedder.dim) and together.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(together, apart, atol=1e-5)


def test_single_string_is_refused(embedder):
    with pytest.raises(TypeError, match="list of texts"):
        embedder.embed("not a list")


def test_unknown_embedder_name_is_refused():
    with pytest.raises(ModelLoadError, match="all-minilm-l6-v2"):
        TextEmbedder.load("no-such-embedder")


@pytest.mark.slow
def test_default_embedder_ranks_paraphrase_above_unrelated():
    embedder = TextEmbedder.load()
    assert embedder.dim == 384
    query, paraphrase, unrelated = embedder.embed(
        ["The cat sat on the mat.", "A feline rested on a rug.", "Stock markets fell sharply."]
    )
    assert query @ paraphrase > 0.4 > query @ unrelated
