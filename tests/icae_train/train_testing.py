"""Tiny ICAEs and corpora for the training and evaluation tests (milliseconds per step).

Tests import these by module name (`from train_testing import ...`); fixtures are in conftest.py.
"""

from __future__ import annotations

import random
from pathlib import Path

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


def write_corpus(root: Path, documents: int = 8, words: int = 120, seed: int = 0) -> Path:
    """A folder of .txt documents of random sentences from a small vocabulary."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        (root / f"doc{i:02d}.txt").write_text(f"Document {i}. {text}.\n")
    return root
