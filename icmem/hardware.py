"""Which float type runs fast on this machine, per phase.

Machines of one kind differ: CPUs with AMX or AVX-512-bf16 run bfloat16 matrix products in
hardware, while AVX2-only CPUs emulate them (a forward pass about 6x and LoRA training about
35x slower than float32, measured in shared/DESIGN.md). A dtype that is fast on one machine is
therefore a trap on the other, and ``"auto"`` asks this module instead.

The phases differ too. Compression, prefill and training multiply matrices by many positions
at once: compute-bound, fast in bf16 only where the CPU does bf16 in hardware
(:func:`fast_dtype`). A decode step multiplies every weight by one vector: bound by the bytes
it reads, which bf16 halves, but on a CPU that emulates bf16 the conversion can cost more than
the bytes save. Measured on AVX2-only 2-core machines, a SmolLM2 decode step: 41 ms in bf16
against 68 in fp32 on two threads (issue 21); on an EPYC 70 against 58 on one thread and 46
against 59 on two (``benchmarks/results/decode_step_options.json``). No flag tells these
apart, so :func:`decode_dtype` times bandwidth-bound matrix-vector products in each.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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


# The decode probe: matrix-vector products over a decoder's worth of distinct matrices of a
# small model's shape (24 x 576 x 1536, 85 MB in fp32), more than a CPU caches, so that they
# read memory as a decode step does. bf16 must win by this factor to be chosen: a whole step
# also pays for attention, norms and Python, so a small gain in the products is none per step
# (on an AVX2-only EPYC, one thread: products 0.70-0.79x the fp32 time, the step 1.2x;
# two threads: products 0.44x, the step 0.78x; benchmarks/results/decode_step_options.json).
_PROBE_SHAPE, _PROBE_MATRICES, _PROBE_REPEATS = (1536, 576), 24, 3
_DECODE_MARGIN = 0.6


def decode_dtype() -> str:
    """The dtype a decode step runs fastest in here, with torch's current thread count:
    ``"bfloat16"`` where a GPU or the CPU's bf16 instructions make it fast, else the faster of
    the two in a short measurement (well under a second, once per process and thread count:
    on an AVX2-only EPYC bf16 loses on one thread and wins on two; see the module docstring)."""
    import torch

    return _decode_dtype(torch.get_num_threads())


@functools.cache
def _decode_dtype(threads: int) -> str:
    import torch

    if fast_dtype() == "bfloat16":
        return "bfloat16"
    fp32, bf16 = (_matvec_seconds(getattr(torch, name)) for name in ("float32", "bfloat16"))
    return "bfloat16" if bf16 < _DECODE_MARGIN * fp32 else "float32"


def _matvec_seconds(dtype: torch.dtype) -> float:
    """The best of a few timings of one vector through every probe matrix."""
    import torch

    weights = [torch.full(_PROBE_SHAPE, 0.01, dtype=dtype) for _ in range(_PROBE_MATRICES)]
    vector = torch.full((1, _PROBE_SHAPE[1]), 0.5, dtype=dtype)
    best = float("inf")
    with torch.no_grad():
        for _ in range(_PROBE_REPEATS):
            start = time.perf_counter()
            for weight in weights:
                torch.nn.functional.linear(vector, weight)
            best = min(best, time.perf_counter() - start)
    return best


def resolve_decode_dtype(dtype: str) -> str:
    """The dtype decoding runs in: ``"auto"`` becomes ``decode_dtype()``, anything else is
    kept (an explicit model dtype decodes in that dtype too)."""
    return decode_dtype() if dtype == AUTO else dtype
