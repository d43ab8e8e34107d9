"""The In-Context Autoencoder: compress spans into memory slots, decode from multi-span memory.

`ICAE` and the training types import torch, transformers and peft, so they load on first use;
`MemorySlots` and `ICAEConfig` are cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_LAZY = {
    "ICAE": "icmem.icae.model",
    "ICAEExample": "icmem.icae.model",
    "Sampling": "icmem.icae.decoder",
    "ICAEConfig": "icmem.icae.config",
    "MemorySlots": "icmem.icae.slots",
    "ICAEError": "icmem.icae.errors",
    "ICAEConfigError": "icmem.icae.errors",
    "CheckpointError": "icmem.icae.errors",
    "CorruptCheckpointError": "icmem.icae.errors",
    "BaseModelMismatchError": "icmem.icae.errors",
    "NoDefaultCheckpointError": "icmem.icae.errors",
}

__all__ = [
    "ICAE",
    "BaseModelMismatchError",
    "CheckpointError",
    "CorruptCheckpointError",
    "ICAEConfig",
    "ICAEConfigError",
    "ICAEError",
    "ICAEExample",
    "MemorySlots",
    "NoDefaultCheckpointError",
    "Sampling",
]

if TYPE_CHECKING:
    from icmem.icae.config import ICAEConfig
    from icmem.icae.decoder import Sampling
    from icmem.icae.errors import (
        BaseModelMismatchError,
        CheckpointError,
        CorruptCheckpointError,
        ICAEConfigError,
        ICAEError,
        NoDefaultCheckpointError,
    )
    from icmem.icae.model import ICAE, ICAEExample
    from icmem.icae.slots import MemorySlots


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'icmem.icae' has no attribute {name!r}")
    return getattr(import_module(module), name)
