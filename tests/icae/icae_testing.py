"""Shared helpers of the ICAE model tests (a module, not a conftest, so tests can import it)."""

from __future__ import annotations

import torch
from tiny_models import tiny_model

from icmem.icae import ICAE

TINY_CONFIG = dict(
    num_memory_tokens=8,
    span_tokens=32,
    min_memory_tokens=2,
    lora_rank=4,
    lora_alpha=8,
    lora_dropout=0.0,
)
MAX_POSITIONS = 256


def base_model(seed: int = 0) -> torch.nn.Module:
    """The tiny Llama (GQA) every ICAE here is built on; equal seeds give equal weights."""
    return tiny_model("llama", heads=4, kv_heads=2, max_positions=MAX_POSITIONS, seed=seed)


def randomise_trained_tensors(icae: ICAE, seed: int = 1) -> None:
    """Give LoRA B (zero at init) and the new embeddings random values, as training would, so
    that tests can tell an adapter that is on from one that is off."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in icae.trainable_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
