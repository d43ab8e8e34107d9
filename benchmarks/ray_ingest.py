"""Ingestion throughput on the default models: one process against `ingest_with_ray` with N
workers, on the same documents in the same run; plus what Ray and one worker cost to start, and
where the workers' time goes.

    .venv/bin/python benchmarks/ray_ingest.py --documents 6 --workers 2 --save
    .venv/bin/python benchmarks/ray_ingest.py --tiny     # the tests' tiny models: checks the script

Each Ray worker loads the ICAE and the embedder once and runs torch on one thread; the single
process runs on every core. Times include loading the models (each worker loads its own), as a
one-off `icmem ingest` pays them; `*_encode_s` leave the loading out. `ray.stage_share` splits
the time the workers spent reading, tokenizing, compressing and embedding (summed over the
workers) and the driver spent writing, each as a share of their sum.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from icae_common import emit, play_text

from icmem.distributed import DefaultModels, ModelLoader, ingest_with_ray
from icmem.documents import TextDocument
from icmem.ingest import STAGES
from icmem.pipeline import MemoryPipeline

TESTS = str(Path(__file__).resolve().parents[1] / "tests")

SPAN_TOKENS = 512  # the default span: each document is one span


def documents(count: int, tokens: int, tokenizer) -> list[TextDocument]:
    """`count` consecutive pieces of a play, each one span of `tokens` tokens."""
    ids = tokenizer(play_text(), add_special_tokens=False).input_ids[: count * tokens]
    return [
        TextDocument.from_text(tokenizer.decode(ids[i * tokens : (i + 1) * tokens]), f"hamlet-{i}")
        for i in range(count)
    ]


def single_process(docs: list[TextDocument], models: ModelLoader) -> dict:
    rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    icae, embedder = models.load()
    loaded = time.perf_counter()
    model_mb = (psutil.Process().memory_info().rss - rss) / 2**20
    with tempfile.TemporaryDirectory() as store:
        from icmem.store import MemoryStore

        opened = MemoryStore.open(store, dim=embedder.dim)
        with MemoryPipeline(icae, opened, embedder) as pipeline:
            for doc in docs:
                pipeline.ingest(doc.texts[0], document_id=doc.document_id)
            spans = pipeline.store.stats().spans
    end = time.perf_counter()
    return {
        "threads": torch.get_num_threads(),
        "load_s": round(loaded - start, 2),
        "encode_s": round(end - loaded, 2),
        "total_s": round(end - start, 2),
        "spans": spans,
        "model_rss_mb": round(model_mb),
    }


def with_ray(docs: list[TextDocument], workers: int, models: ModelLoader) -> dict:
    import ray

    start = time.perf_counter()
    # The tiny models are defined in tests/, which the workers must be able to import.
    env = {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    ray.init(
        num_cpus=workers,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as store:
        report = ingest_with_ray(docs, store, models=models, num_workers=workers, progress=False)
    end = time.perf_counter()
    ray.shutdown()
    staged = sum(report.seconds.values())
    return {
        "workers": workers,
        "ray_start_s": round(started - start, 2),
        "ingest_s": round(end - started, 2),
        "total_s": round(end - start, 2),
        "spans": report.spans,
        "stage_seconds": {stage: round(report.seconds[stage], 3) for stage in STAGES},
        "stage_share": {stage: round(report.seconds[stage] / staged, 3) for stage in STAGES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=6, help="of one 512-token span each")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny random models")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()

    models: ModelLoader
    if args.tiny:
        sys.path.insert(0, TESTS)
        from tiny_models import TinyIngestModels, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        models = TinyIngestModels(tokenizer)
    else:
        from icmem.models import load_tokenizer

        tokenizer = load_tokenizer()
        models = DefaultModels()
    docs = documents(args.documents, SPAN_TOKENS, tokenizer)
    tokens = args.documents * SPAN_TOKENS
    single = single_process(docs, models)
    ray_run = with_ray(docs, args.workers, models)
    # One worker's own start-up is its model load (measured in the single process) on top of
    # Ray's; the encode time on Ray is what is left of the ingest once the workers have loaded.
    ray_run["encode_s_estimate"] = round(ray_run["ingest_s"] - single["load_s"], 2)
    for run in (single, ray_run):
        run["spans_per_s"] = round(single["spans"] / run["total_s"], 3)
        run["tokens_per_s"] = round(tokens / run["total_s"], 1)
    single["encode_tokens_per_s"] = round(tokens / single["encode_s"], 1)
    emit(
        "ray_ingest_tiny" if args.tiny else "ray_ingest",
        {
            "benchmark": "ray_ingest",
            "models": "tiny (tests/tiny_models.py)" if args.tiny else "default",
            "documents": args.documents,
            "tokens": tokens,
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 1),
            "machine": platform.processor() or platform.machine(),
            "single_process": single,
            "ray": ray_run,
            "ray_vs_single_total": round(single["total_s"] / ray_run["total_s"], 3),
        },
        args.save,
    )


if __name__ == "__main__":
    main()
