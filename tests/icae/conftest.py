"""Tiny ICAEs for the model tests: small k and spans so every test runs in well under a second."""

from __future__ import annotations

import pytest
import torch
from icae_testing import TINY_CONFIG, base_model, randomise_trained_tensors

from icmem.icae import ICAE


@pytest.fixture
def make_icae(tokenizer):
    """Build a tiny ICAE; `trained=True` randomises its trainable tensors."""

    def make(seed: int = 0, trained: bool = True, **overrides) -> ICAE:
        icae = ICAE.from_base((base_model(seed), tokenizer), **{**TINY_CONFIG, **overrides})
        if trained:
            randomise_trained_tensors(icae)
        return icae.eval()

    return make


@pytest.fixture
def icae(make_icae) -> ICAE:
    return make_icae()


@pytest.fixture
def reference_model() -> torch.nn.Module:
    """An untouched copy of the ICAE's base model, for computations built by hand."""
    return base_model(0)
