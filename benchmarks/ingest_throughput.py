"""Ingestion throughput in one process: spans/s and tokens/s of `MemoryPipeline.ingest_files` over a
small mixed corpus (txt, md, html, jsonl cut from a Shakespeare play), on the tests' tiny random
ICAE and on the default model (shipped ICAE on SmolLM2-135M, all-MiniLM-L6-v2 embedder), with
the share of wall time spent reading, tokenizing, compressing, embedding and writing.

    .venv/bin/python benchmarks/ingest_throughput.py --save    # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from icae_common import emit, play_text
from icmem.store import MemoryStore

from icmem.ingest import STAGES
from icmem.pipeline import MemoryPipeline

NS = ("bench", "ingest", "run")


def write_corpus(root: Path, files: int, chars: int) -> int:
    """`files` documents of about `chars` characters, a quarter in each format; returns the
    number of bytes written."""
    text = play_text()
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(files):
        start = (i * chars) % (len(text) - chars)  # wraps around: every document is full
        piece = text[start : start + chars]
        kind = i % 4
        if kind == 0:
            (root / f"doc{i:04d}.txt").write_text(piece, encoding="utf-8")
        elif kind == 1:
            (root / f"doc{i:04d}.md").write_text(f"# Part {i}\n\n{piece}", encoding="utf-8")
        elif kind == 2:
            paragraphs = "".join(f"<p>{p}</p>" for p in piece.split("\n\n"))
            html = f"<html><head><title>Part {i}</title></head><body>{paragraphs}</body></html>"
            (root / f"doc{i:04d}.html").write_text(html, encoding="utf-8")
        else:
            records.append(json.dumps({"text": piece}))
    (root / "records.jsonl").write_text("\n".join(records) + "\n", encoding="utf-8")
    return sum(p.stat().st_size for p in root.iterdir())


def measure(name: str, pipeline: MemoryPipeline, corpus: Path, corpus_bytes: int) -> dict:
    started = time.perf_counter()
    report = pipeline.ingest_files([corpus], namespace=NS, progress=False)
    wall = time.perf_counter() - started
    assert not report.unreadable, report.unreadable
    staged = sum(report.seconds.values())
    return {
        "model": name,
        "files": report.files,
        "documents": report.ingested,
        "corpus_bytes": corpus_bytes,
        "spans": report.spans,
        "tokens": report.tokens,
        "seconds": round(wall, 3),
        "spans_per_s": round(report.spans / wall, 2),
        "tokens_per_s": round(report.tokens / wall, 1),
        "stage_seconds": {s: round(report.seconds[s], 3) for s in STAGES},
        "stage_share": {s: round(report.seconds[s] / wall, 3) for s in STAGES},
        "other_share": round(max(0.0, wall - staged) / wall, 3),
    }


def tiny_pipeline(directory: Path) -> MemoryPipeline:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import tiny_embedder, tiny_icae, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    icae, embedder = tiny_icae(tokenizer), tiny_embedder(tokenizer)
    store = MemoryStore.open(directory, dim=embedder.dim, model_fingerprint=icae.fingerprint)
    return MemoryPipeline(icae, store, embedder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-files", type=int, default=120, help="files for the tiny model")
    parser.add_argument("--default-files", type=int, default=4, help="files, default model")
    parser.add_argument("--chars", type=int, default=2000, help="characters per file")
    parser.add_argument(
        "--tiny-threads", type=int, default=1, help="tiny matmuls: one thread is fastest"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="default")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = write_corpus(root / "tiny-corpus", args.tiny_files, args.chars)
        torch.set_num_threads(args.tiny_threads)
        with tiny_pipeline(root / "tiny-store") as pipeline:
            runs.append(
                measure(
                    "tiny random ICAE (tests/tiny_models.py)", pipeline, root / "tiny-corpus", size
                )
            )
        torch.set_num_threads(args.threads)
        size = write_corpus(root / "corpus", args.default_files, args.chars)
        started = time.perf_counter()
        with MemoryPipeline.open(root / "store", create=True) as pipeline:
            load_seconds = time.perf_counter() - started
            run = measure(
                "default (shipped ICAE, SmolLM2-135M + MiniLM)", pipeline, root / "corpus", size
            )
        run["load_seconds"] = round(load_seconds, 2)
        runs.append(run)
    result = {
        "machine": platform.processor() or platform.machine(),
        "threads": {"tiny": args.tiny_threads, "default": args.threads},
        "chars_per_file": args.chars,
        "runs": runs,
    }
    emit("ingest_throughput", result, args.save)


if __name__ == "__main__":
    main()
