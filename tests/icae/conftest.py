"""Tiny ICAEs for the model tests: small k and spans so every test runs in well under a second."""

from __future__ import annotations

import pytest
import torch
from icae_testing import randomise_trained_tensors
from tiny_models import tiny_icae, tiny_icae_base

from icmem.icae import ICAE


@pytest.fixture
def make_icae(tokenizer):
    """Build a tiny ICAE; `trained=True` randomises its trainable tensors."""

    def make(seed: int = 0, trained: bool = True, **overrides) -> ICAE:
        icae = tiny_icae(tokenizer, seed=seed, **overrides)
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
    return tiny_icae_base(0)
