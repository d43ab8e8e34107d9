from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_embedder, tiny_icae, tiny_model, tiny_tokenizer

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tokenizer():
    """Byte-level BPE tokenizer with a chat template, shared by the tiny models."""
    return tiny_tokenizer()


@pytest.fixture
def llama_gqa():
    """Tiny Llama with grouped-query attention (4 query heads, 2 KV heads)."""
    return tiny_model("llama", heads=4, kv_heads=2)


@pytest.fixture
def llama_mha():
    """Tiny Llama with plain multi-head attention."""
    return tiny_model("llama", heads=4, kv_heads=4)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model and tokenizer (marked tests only)."""
    import icmem

    return icmem.load_model("smollm2-135m-instruct")


@pytest.fixture
def pipeline(tmp_path, tokenizer):
    """A MemoryPipeline over a fresh store with an untrained tiny ICAE and a tiny embedder."""
    from icmem.store import MemoryStore

    from icmem.pipeline import MemoryPipeline

    icae, embedder = tiny_icae(tokenizer), tiny_embedder(tokenizer)
    store = MemoryStore.open(
        tmp_path / "store", dim=embedder.dim, model_fingerprint=icae.fingerprint
    )
    with MemoryPipeline(icae, store, embedder, codec="fp32") as opened:
        yield opened
