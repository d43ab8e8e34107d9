"""One large text file through `MemoryPipeline.ingest_files`: what committing it in parts costs,
how soon work is kept, and what an interrupted run redoes.

On the tests' tiny random ICAE (compression is cheap there, so the parts' overhead shows at its
largest), in the same run: the file written in parts of `--batch-spans` spans against the same
file written in one transaction (`batch_spans` above its span count); then a run interrupted
(Ctrl-C, simulated) after half of its parts and resumed, counting the spans each run compressed.
With `--default`, also the shipped ICAE on SmolLM2-135M over a 2 MB file, interrupted after its
first part: the progress bar's total, the seconds until the first part was kept, spans/s.

    .venv/bin/python benchmarks/ingest_large_file.py --save        # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/ingest_large_file.py --default --save  # + minutes per 64 spans

The tiny runs alternate (parts, whole) `--repeats` times and report medians, so that the ratio
holds on a shared machine; results go to ingest_large_file.json (tiny) and
ingest_large_file_default.json (`--default`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from icae_common import emit, play_text
from ingest_throughput import tiny_pipeline

from icmem.ingest import STAGES
from icmem.pipeline import MemoryPipeline
from icmem.writing import DocumentWriter

NS = ("bench", "large", "file")


def write_file(path: Path, size: int) -> int:
    text = play_text()
    path.write_text((text * (size // len(text) + 1))[:size], encoding="utf-8")
    return path.stat().st_size


class Commits:
    """Wraps `DocumentWriter`'s commits: when each one ended, and Ctrl-C right after the
    `stop_after`-th."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.started = time.perf_counter()
        self.times: list[float] = []
        self.stop_after = stop_after
        self.real = {name: getattr(DocumentWriter, name) for name in ("write", "write_part")}

    def __enter__(self) -> Commits:
        for name, real in self.real.items():
            setattr(DocumentWriter, name, self._wrap(real))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name, real in self.real.items():
            setattr(DocumentWriter, name, real)

    def _wrap(self, real):
        def commit(writer, *args):
            result = real(writer, *args)
            self.times.append(time.perf_counter() - self.started)
            if len(self.times) == self.stop_after:
                raise KeyboardInterrupt
            return result

        return commit


def run(pipeline: MemoryPipeline, path: Path, batch_spans: int) -> dict:
    with Commits() as commits:
        report = pipeline.ingest_files(
            [path], namespace=NS, batch_spans=batch_spans, progress=False
        )
    wall = time.perf_counter() - commits.started
    return {
        "batch_spans": batch_spans,
        "spans": report.spans,
        "commits": len(commits.times),
        "seconds": round(wall, 3),
        "first_commit_seconds": round(commits.times[0], 3),
        "stage_seconds": {s: round(report.seconds[s], 3) for s in STAGES},
    }


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def tiny(root: Path, size: int, batch_spans: int, repeats: int) -> dict:
    path = root / "large.txt"
    file_bytes = write_file(path, size)
    with tiny_pipeline(root / "warm") as pipeline:  # loads and warms the tiny models
        pipeline.ingest_files([path], namespace=NS, progress=False)
    runs: dict[str, list[dict]] = {"parts": [], "whole": []}
    for i in range(repeats):  # alternated, so that both see the same load
        for mode, spans in (("parts", batch_spans), ("whole", 10**9)):
            with tiny_pipeline(root / f"{mode}-{i}") as pipeline:
                runs[mode].append(run(pipeline, path, spans))
    parts, whole = median_run(runs["parts"]), median_run(runs["whole"])
    with tiny_pipeline(root / "resumed") as pipeline:
        half = parts["commits"] // 2
        with Commits(stop_after=half), contextlib.suppress(KeyboardInterrupt):
            pipeline.ingest_files([path], namespace=NS, batch_spans=batch_spans, progress=False)
        kept = pipeline.store.stats().spans  # all namespaces: the parts are all there is
        resumed = run(pipeline, path, batch_spans)
        stored = pipeline.store.stats(NS).spans
    return {
        "model": "tiny random ICAE (tests/tiny_models.py)",
        "file_bytes": file_bytes,
        "repeats": repeats,
        "parts": parts,
        "whole": whole,
        "parts_over_whole_seconds": round(parts["seconds"] / whole["seconds"], 3),
        "interrupted_after_commits": half,
        "spans_kept_at_interrupt": kept,
        "spans_compressed_on_resume": resumed["spans"],
        "spans_stored_after_resume": stored,
    }


def default_model(root: Path, size: int, batch_spans: int) -> dict:
    path = root / "large-default.txt"
    file_bytes = write_file(path, size)
    import tqdm

    totals: list[int | None] = []

    class Recording(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if kwargs.get("unit") == "span":
                totals.append(self.total)

    real_tqdm, tqdm.tqdm = tqdm.tqdm, Recording
    try:
        with MemoryPipeline.open(root / "default-store", create=True) as pipeline:
            with Commits(stop_after=1) as commits, contextlib.suppress(KeyboardInterrupt):
                pipeline.ingest_files([path], namespace=NS, batch_spans=batch_spans, progress=True)
            kept = pipeline.store.stats().spans
    finally:
        tqdm.tqdm = real_tqdm
    return {
        "model": "default (shipped ICAE, SmolLM2-135M + MiniLM)",
        "file_bytes": file_bytes,
        "bar_total_spans": totals[0],
        "first_part_kept_seconds": round(commits.times[0], 2),
        "spans_kept_at_interrupt": kept,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-bytes", type=int, default=150_000, help="file size, tiny model")
    parser.add_argument("--default-bytes", type=int, default=2_000_000, help="with --default")
    parser.add_argument("--batch-spans", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="tiny runs of each mode")
    parser.add_argument("--default", action="store_true", help="the shipped model instead")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/")
    args = parser.parse_args()
    result: dict = {
        "machine": platform.processor() or platform.machine(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.default:
            result |= default_model(Path(tmp), args.default_bytes, args.batch_spans)
        else:
            torch.set_num_threads(1)  # tiny matmuls: one thread is fastest
            result |= tiny(Path(tmp), args.tiny_bytes, args.batch_spans, args.repeats)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    emit("ingest_large_file_default" if args.default else "ingest_large_file", result, args.save)


if __name__ == "__main__":
    main()
