"""Tiny ICAEs and corpora for the training and evaluation tests (milliseconds per step)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_ICAE_CONFIG, tiny_model

from icmem.icae.model import ICAE

# Dropout > 0 so that resuming must restore the dropout RNG too.
TINY_ICAE = {**TINY_ICAE_CONFIG, "lora_dropout": 0.1}
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "memory",
    "keeps",
    "what",
    "matters",
    "and",
    "forgets",
    "rest",
    "Paris",
    "capital",
    "France",
    "Berlin",
    "Germany",
    "numbers",
    "names",
    "places",
    "Alice",
    "Bob",
    "London",
    "Tokyo",
]


def build_tiny_icae(tokenizer, seed: int = 0, **overrides) -> ICAE:
    model = tiny_model("llama", heads=4, kv_heads=2, max_positions=256, seed=seed)
    return ICAE.from_base((model, tokenizer), **{**TINY_ICAE, **overrides})


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny matmuls run faster on one thread than they sync across two (and far faster when
    the cores are shared); the session setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_icae(tokenizer):
    return lambda **overrides: build_tiny_icae(tokenizer, **overrides)


def write_corpus(root: Path, documents: int = 8, words: int = 120, seed: int = 0) -> Path:
    """A folder of .txt documents of random sentences from a small vocabulary."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        (root / f"doc{i:02d}.txt").write_text(f"Document {i}. {text}.\n")
    return root


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")
