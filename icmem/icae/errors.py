"""Errors raised by the In-Context Autoencoder; each says what went wrong and how to fix it."""

from __future__ import annotations

from icmem.errors import IcmemError


class ICAEError(IcmemError):
    """Base class for ICAE errors."""


class ICAEConfigError(ICAEError, ValueError):
    """An ICAE config or call argument is invalid."""


class CheckpointError(ICAEError):
    """An ICAE checkpoint cannot be used."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is missing, truncated or damaged."""


class BaseModelMismatchError(CheckpointError):
    """A checkpoint (or memory) was made for a different base model than the one given."""


class NoDefaultCheckpointError(CheckpointError):
    """No trained checkpoint ships with this installation."""
