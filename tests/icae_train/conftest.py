"""Fixtures of the training and evaluation tests; helpers are in train_testing.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_testing import write_corpus


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny matmuls run faster on one thread than they sync across two (and far faster when
    the cores are shared); the session setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")
