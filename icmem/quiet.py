"""A library is quiet unless asked: what transformers and peft print while icmem loads and runs
models (weight-loading bars, deprecations of their own internals) is for their developers, not
for the person calling icmem.

Asking: enable INFO logging for ``icmem`` (``logging.basicConfig(level=logging.INFO)``, or
``icmem -v``), and loading shows the libraries' bars and warnings again.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Deprecations that transformers raises for calls its own code (or peft's) makes on icmem's
# behalf: nothing an icmem user can change. Matched by message, so every other warning shows.
LIBRARY_DEPRECATIONS = (
    r"`is_gradient_checkpointing` is deprecated",
    r"`past_key_values` is deprecated",
)


def verbose() -> bool:
    """Whether the caller asked to hear the libraries: INFO logging is on for icmem."""
    return logging.getLogger("icmem").isEnabledFor(logging.INFO)


def ignore_library_deprecations() -> None:
    """Hide `LIBRARY_DEPRECATIONS` (once per process; a matching filter is not added twice)."""
    for message in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Load weights without transformers' progress bars and advisory logging (restored
    afterwards), unless `verbose()`."""
    if verbose():
        yield
        return
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
