"""Shared helpers of the ICAE model tests (a module, not a conftest, so tests can import it)."""

from __future__ import annotations

import torch

from icmem.icae import ICAE


def randomise_trained_tensors(icae: ICAE, seed: int = 1) -> None:
    """Give LoRA B (zero at init) and the new embeddings random values, as training would, so
    that tests can tell an adapter that is on from one that is off."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in icae.trainable_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
