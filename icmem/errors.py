"""Exceptions shared across icmem. Each message names the problem and the fix."""

from __future__ import annotations


class IcmemError(Exception):
    """Base class for every error icmem raises on purpose."""


class ModelLoadError(IcmemError):
    """A model or tokenizer could not be found or loaded."""


class ChunkingError(IcmemError):
    """Input text could not be decoded or chunked."""


class ConversationError(IcmemError, ValueError):
    """A conversation cannot be answered as given (no user message, malformed turns)."""
