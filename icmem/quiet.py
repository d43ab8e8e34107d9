"""A library is quiet unless asked: what transformers and peft print while icmem loads and runs
models (weight-loading bars, deprecations of their own internals) is for their developers, not
for the person calling icmem.

Asking: enable INFO logging for ``icmem`` (``logging.basicConfig(level=logging.INFO)``, or
``icmem -v``), and loading shows the libraries' bars and advisories, and transformers' logged
deprecations, again. The `LIBRARY_DEPRECATIONS` raised as Python warnings stay hidden (a warnings
filter is process-wide and set once); ``python -W default`` or pytest shows them.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Deprecations that transformers raises for calls its own code (or peft's) makes on icmem's
# behalf: nothing an icmem user can change. Matched by message, so every other warning shows.
LIBRARY_DEPRECATIONS = (
    r"`is_gradient_checkpointing` is deprecated",
    r"`past_key_values` is deprecated",
    r"`past_key_values`/`cache_params` are deprecated",
)
# Loggers transformers writes such deprecations to (``logger.warning_once``), not as warnings.
LIBRARY_DEPRECATION_LOGGERS = ("transformers.utils.generic",)


class _HideLibraryDeprecations(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return verbose() or not any(re.search(m, record.getMessage()) for m in LIBRARY_DEPRECATIONS)


def verbose() -> bool:
    """Whether the caller asked to hear the libraries: INFO logging is on for icmem."""
    return logging.getLogger("icmem").isEnabledFor(logging.INFO)


def ignore_library_deprecations() -> None:
    """Hide `LIBRARY_DEPRECATIONS`, as warnings and as log records (once per process; a filter
    is not added twice)."""
    for message in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for name in LIBRARY_DEPRECATION_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HideLibraryDeprecations) for f in logger.filters):
            logger.addFilter(_HideLibraryDeprecations())


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
