"""Fixtures of the ICAE model tests (`make_icae` is in tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_icae_base

from icmem.icae import ICAE


@pytest.fixture
def icae(make_icae) -> ICAE:
    """A tiny ICAE whose trainable tensors hold random values, as after training."""
    return make_icae(trained=True)


@pytest.fixture
def reference_model() -> torch.nn.Module:
    """An untouched copy of the ICAE's base model, for computations built by hand."""
    return tiny_icae_base(0)
