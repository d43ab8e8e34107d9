"""Which float type runs fast on this machine.

Machines of one kind differ: CPUs with AMX or AVX-512-bf16 run bfloat16 matrix products in
hardware, while AVX2-only CPUs emulate them (a forward pass about 6x and LoRA training about
35x slower than float32, measured in shared/DESIGN.md). A dtype that is fast on one machine is
therefore a trap on the other, and ``"auto"`` asks this module instead.

Decoding keeps the model's dtype under ``"auto"`` (``icae.decoder.Decoder.dtype`` says why
and how to force another).
"""

from __future__ import annotations

import functools
from pathlib import Path

AUTO = "auto"
_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def fast_dtype() -> str:
    """``"bfloat16"`` where a GPU or the CPU's bf16 instructions make it fast, else
    ``"float32"``."""
    import torch

    if torch.cuda.is_available() or cpu_flags() & _BF16_CPU_FLAGS:
        return "bfloat16"
    return "float32"


def resolve_dtype(dtype: str) -> str:
    """A concrete dtype name: ``"auto"`` becomes ``fast_dtype()``, anything else is kept."""
    return fast_dtype() if dtype == AUTO else dtype
