from __future__ import annotations

import pytest
import torch
from tiny_models import randomise_trained_tensors, tiny_embedder, tiny_icae, tiny_tokenizer

# Fixtures defined in helper modules, registered here once for every folder of tests.
pytest_plugins = ["postgres_testing"]

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tokenizer():
    """Byte-level BPE tokenizer with a chat template, shared by the tiny models."""
    return tiny_tokenizer()


@pytest.fixture
def make_icae(tokenizer):
    """Build a tiny ICAE in eval mode: `make_icae(seed=0, trained=False, **config_overrides)`.
    `trained=True` gives its trainable tensors (LoRA B, memory embeddings) random values, as
    training would, so that an adapter that is on differs from one that is off."""

    def make(seed: int = 0, *, trained: bool = False, **overrides):
        icae = tiny_icae(tokenizer, seed=seed, **overrides)
        if trained:
            randomise_trained_tensors(icae)
        return icae.eval()

    return make


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
