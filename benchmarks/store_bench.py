"""Memory-store benchmark: add throughput, search latency (unfiltered, and filtered to half of
the spans), slot fetches, bytes on disk, search latency among many namespaces (one thread,
a tenant prefix, a deep path), a prefix search over 1,000 namespaces of 100 spans beside one
index of the same size, the first search of a fresh reader after a writer that closed and after
one killed with SIGKILL, and the LangGraph store beside LangGraph's InMemoryStore (filtered
search, list_namespaces, TTL sweep; `--langgraph-items`). The JSON carries the command that
produced it and the load average.

Synthetic but embedding-shaped data: unit vectors of dim 384 drawn around 1,000 centres, each span
carrying a 128x576 bf16 slot blob (the ICAE's size for SmolLM2). The baseline, measured in the same
run on the same vectors, is LangChain's community FAISS vector store (flat inner product,
in-memory docstore); it keeps no slots and writes nothing to disk, so its add rate is an upper
bound for an index-only store. Prints one JSON object and writes it to
benchmarks/results/store_bench.json.

    .venv/bin/python benchmarks/store_bench.py                       # 10k and 100k spans
    .venv/bin/python benchmarks/store_bench.py --sizes 10000,100000,1000000
    .venv/bin/python benchmarks/store_bench.py --sizes '' --codec-spans 0 --namespaces 0 \
        --out benchmarks/results/store_bench_v3.json        # the store v3 sections only

A run too long for one quiet window can be split: run the first part as usual and each other
part with `--merge` and the same `--out`; the file then lists each part's command and load
average under `runs`, and its `command` chains them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from icmem.store import DocumentRecord, MemoryStore, SpanRecord

from icmem.codec import CODECS, encode_slots

FINGERPRINT = "store-bench-model"
SPANS_PER_DOCUMENT = 8


def clustered_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    centres = np.random.default_rng(0).standard_normal((1_000, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    points = centres[rng.integers(0, 1_000, n)] + 0.5 * rng.standard_normal((n, dim), np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def slot_pool(codec: str, shape: tuple[int, int], size: int = 32) -> list[bytes]:
    rng = np.random.default_rng(1)
    return [
        encode_slots(rng.standard_normal(shape, np.float32), codec=codec, fingerprint=FINGERPRINT)
        for _ in range(size)
    ]


def documents(vectors: np.ndarray, start: int, count: int, pool: list[bytes] | None):
    out = []
    for doc in range(start // SPANS_PER_DOCUMENT, (start + count) // SPANS_PER_DOCUMENT):
        spans = []
        for p in range(SPANS_PER_DOCUMENT):
            i = doc * SPANS_PER_DOCUMENT + p
            spans.append(
                SpanRecord(
                    position=p,
                    char_start=2_000 * p,
                    char_end=2_000 * p + 1_999,
                    text=f"document {doc} span {p}",
                    token_count=512,
                    slots=pool[i % len(pool)] if pool else None,
                    embedding=vectors[i],
                )
            )
        metadata = {"doc": doc, "half": doc % 2 == 0}
        out.append(DocumentRecord(id=f"doc-{doc}", source="bench", metadata=metadata, spans=spans))
    return out


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def bench_memory_store(
    directory: Path, vectors: np.ndarray, queries: np.ndarray, pool, batch: int, k: int
) -> dict:
    n, dim = vectors.shape
    ns = ("bench", "agent", "thread")
    with MemoryStore.open(directory, dim=dim, model_fingerprint=FINGERPRINT) as store:
        started = time.perf_counter()
        for start in range(0, n, batch):
            store.add(documents(vectors, start, min(batch, n - start), pool), namespace=ns)
        add_s = time.perf_counter() - started
        started = time.perf_counter()
        store.save_index()
        save_s = time.perf_counter() - started
        for q in queries[:10]:
            store.search(q, k, namespace=ns)
        search_s, found = [], []
        for q in queries:
            started = time.perf_counter()
            hits = store.search(q, k, namespace=ns)
            search_s.append(time.perf_counter() - started)
            found.append([h.span_id for h in hits])
        span_ids = store.span_ids(ns)
        kind = store._index.shards[next(iter(store._index.shards))].kind
        filtered = bench_filtered(store, ns, vectors, queries, span_ids, k)
        result = {
            "add_spans_per_s": round(n / add_s, 1),
            "add_s": round(add_s, 2),
            "index_save_s": round(save_s, 2),
            "index_kind": kind,
            "search": percentiles(search_s),
            "recall_at_k": recall(found, span_ids, vectors, queries, k),
            **filtered,
            "filtered_p50_ratio": round(
                filtered["search_filtered_half"]["p50_ms"] / percentiles(search_s)["p50_ms"], 2
            ),
        }
        if pool:
            rng = np.random.default_rng(2)
            fetch_s = []
            for _ in range(100):
                chosen = rng.choice(span_ids, 8, replace=False).tolist()
                started = time.perf_counter()
                store.get_slots(chosen)
                fetch_s.append(time.perf_counter() - started)
            result["get_slots_8"] = percentiles(fetch_s)
    result["bytes_on_disk_per_span"] = round(directory_bytes(directory) / n, 1)
    return result


def bench_filtered(store, ns, vectors, queries, span_ids, k: int) -> dict:
    """Filtered search latency with a filter matching half of the spans: the same filter asked
    again and again (what an application with fixed filters sees), and a different filter each
    time (nothing reused). Recall is against brute force over the matching spans."""
    n_docs = len(vectors) // SPANS_PER_DOCUMENT
    half = {"half": True}
    store.search(queries[0], k, namespace=ns, filter=half)
    repeat_s, found = [], []
    for q in queries:
        started = time.perf_counter()
        hits = store.search(q, k, namespace=ns, filter=half)
        repeat_s.append(time.perf_counter() - started)
        found.append([h.span_id for h in hits])
    distinct_s = []
    for i, q in enumerate(queries):
        filter_ = {"doc": {"$lt": n_docs // 2 + i + 1}}  # a new filter every query, ~half
        started = time.perf_counter()
        store.search(q, k, namespace=ns, filter=filter_)
        distinct_s.append(time.perf_counter() - started)
    ordered = np.sort(span_ids)
    rows = np.flatnonzero((np.arange(len(vectors)) // SPANS_PER_DOCUMENT) % 2 == 0)
    exact = rows[np.argsort(-(vectors[rows] @ queries.T), axis=0)[:k].T]
    hits = [len(set(f) & set(ordered[e].tolist())) / k for f, e in zip(found, exact, strict=True)]
    return {
        "search_filtered_half": percentiles(repeat_s),
        "search_filtered_distinct": percentiles(distinct_s),
        "recall_at_k_filtered_half": round(float(np.mean(hits)), 4),
    }


def directory_bytes(directory: Path) -> int:
    """Bytes of every file of a closed store (its WAL is checkpointed and gone by then)."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def recall(found, span_ids, vectors, queries, k) -> float:
    """Share of the exact top-k (brute force over every vector) that the store returned."""
    exact = np.argsort(-(vectors @ queries.T), axis=0)[:k].T  # (queries, k) row numbers
    ordered_ids = np.sort(span_ids)  # span ids were assigned in insertion (row) order
    hits = [
        len(set(f) & set(ordered_ids[e].tolist())) / k for f, e in zip(found, exact, strict=True)
    ]
    return round(float(np.mean(hits)), 4)


def bench_langchain_faiss(vectors: np.ndarray, queries: np.ndarray, batch: int, k: int) -> dict:
    import faiss
    from langchain_community.docstore.in_memory import InMemoryDocstore
    from langchain_community.vectorstores import FAISS
    from langchain_community.vectorstores.utils import DistanceStrategy

    n, dim = vectors.shape
    store = FAISS(
        embedding_function=lambda text: [0.0] * dim,
        index=faiss.IndexFlatIP(dim),
        docstore=InMemoryDocstore(),
        index_to_docstore_id={},
        distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT,
    )
    started = time.perf_counter()
    for start in range(0, n, batch):
        rows = range(start, min(start + batch, n))
        store.add_embeddings(
            [
                (f"document {i // SPANS_PER_DOCUMENT} span {i % SPANS_PER_DOCUMENT}", vectors[i])
                for i in rows
            ],
            metadatas=[{"doc": i // SPANS_PER_DOCUMENT} for i in rows],
        )
    add_s = time.perf_counter() - started
    for q in queries[:10]:
        store.similarity_search_with_score_by_vector(q.tolist(), k=k)
    search_s = []
    for q in queries:
        started = time.perf_counter()
        store.similarity_search_with_score_by_vector(q.tolist(), k=k)
        search_s.append(time.perf_counter() - started)
    return {
        "add_spans_per_s": round(n / add_s, 1),
        "add_s": round(add_s, 2),
        "search": percentiles(search_s),
    }


def bytes_per_codec(work: Path, dim: int, shape: tuple[int, int], spans: int) -> dict:
    vectors = clustered_vectors(spans, dim, seed=3)
    out = {}
    for codec in CODECS:
        directory = work / f"codec-{codec}"
        pool = slot_pool(codec, shape, size=8)
        with MemoryStore.open(directory, dim=dim, model_fingerprint=FINGERPRINT) as store:
            store.add(documents(vectors, 0, spans, pool), namespace=("bench", "codec", codec))
            slot_bytes = store.stats().slot_bytes
        out[codec] = {
            "slot_bytes_per_span": round(slot_bytes / spans, 1),
            "bytes_on_disk_per_span": round(directory_bytes(directory) / spans, 1),
        }
        shutil.rmtree(directory)
    return out


def bench_namespaces(directory: Path, dim: int, count: int, queries: int) -> dict:
    """Search latency when the store holds ``count`` namespaces (50 tenants, one span each):
    what finding a namespace or a prefix's namespaces costs next to the search itself."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((count + 1, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    deep = ("org", "team", "project", "notes", "2026", "q4")

    def one_span(i: int) -> list[DocumentRecord]:
        span = SpanRecord(0, 0, 1, f"span {i}", 1, None, vectors[i])
        return [DocumentRecord(id=f"doc-{i}", spans=[span])]

    with MemoryStore.open(directory, dim=dim) as store:
        started = time.perf_counter()
        for i in range(count):
            store.add(one_span(i), namespace=(f"tenant-{i % 50}", "agent", f"thread-{i}"))
        store.add(one_span(count), namespace=deep)
        add_s = time.perf_counter() - started
        result = {"namespaces": count + 1, "add_namespaces_per_s": round((count + 1) / add_s, 1)}
        for name, prefix in (
            ("search_one_thread", ("tenant-7", "agent", "thread-7")),
            ("search_tenant_prefix", ("tenant-7",)),
            ("search_deep_path", deep),
        ):
            store.search(vectors[0], 10, namespace=prefix)  # load the shards first
            seconds = []
            for q in range(queries):
                started = time.perf_counter()
                store.search(vectors[q % count], 10, namespace=prefix)
                seconds.append(time.perf_counter() - started)
            result[name] = percentiles(seconds)
    return result


_WRITER = """
import sys
sys.path.insert(0, sys.argv[4])
from store_bench import clustered_vectors, documents
from icmem.store import MemoryStore
n, dim = int(sys.argv[2]), int(sys.argv[3])
vectors = clustered_vectors(n, dim, seed=0)
with MemoryStore.open(sys.argv[1], dim=dim) as store:
    for start in range(0, n, 1024):
        batch = documents(vectors, start, min(1024, n - start), None)
        store.add(batch, namespace=("bench", "w", "t"))
"""

_READER = """
import json, sys, time
import numpy as np
started = time.perf_counter()
from icmem.store import MemoryStore
with MemoryStore.open(sys.argv[1], dim=int(sys.argv[2]), read_only=True) as store:
    opened = time.perf_counter()
    store.search(np.ones(int(sys.argv[2]), np.float32), 10, namespace=("bench",))
    searched = time.perf_counter()
result = {"open_s": opened - started, "first_search_s": searched - opened}
print(json.dumps({k: round(v, 3) for k, v in result.items()}))
"""


def bench_first_search_after_write(directory: Path, dim: int, n: int) -> dict:
    """One process only writes `n` spans (no slots) and exits; a fresh read-only process then
    opens the store and searches once: does it find a current index or rebuild one?"""
    import subprocess

    here = str(Path(__file__).resolve().parent)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", _WRITER, str(directory), str(n), str(dim), here], check=True
    )
    write_s = time.perf_counter() - started
    reader = subprocess.run(
        [sys.executable, "-c", _READER, str(directory), str(dim)],
        check=True,
        capture_output=True,
        text=True,
    )
    return {"spans": n, "writer_s": round(write_s, 1), **json.loads(reader.stdout)}


_KILLED_WRITER = """
import sys, time
sys.path.insert(0, sys.argv[4])
from store_bench import clustered_vectors, documents
from icmem.store import MemoryStore
n, dim = int(sys.argv[2]), int(sys.argv[3])
vectors = clustered_vectors(n, dim, seed=0)
store = MemoryStore.open(sys.argv[1], dim=dim)
for start in range(0, n, 1024):
    store.add(documents(vectors, start, min(1024, n - start), None), namespace=("bench", "w", "t"))
    print(min(start + 1024, n), flush=True)
time.sleep(3600)  # killed here with SIGKILL: no close(), no save on exit
"""


def bench_first_search_after_killed_writer(directory: Path, dim: int, n: int) -> dict:
    """One process writes `n` spans (no slots) and is killed with SIGKILL right after its last
    commit, without close(); a fresh read-only process then opens the store and searches once.
    What the reader finds is what the writer saved as it went (`index_saved_spans`); it
    catches up the rest from the rows."""
    import signal
    import subprocess

    here = str(Path(__file__).resolve().parent)
    n -= n % SPANS_PER_DOCUMENT
    started = time.perf_counter()
    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(directory), str(n), str(dim), here],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None
    try:
        for line in writer.stdout:
            if int(line) >= n:
                break
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    write_s = time.perf_counter() - started
    manifests = [json.loads(p.read_text()) for p in (directory / "index").glob("*.json")]
    reader = subprocess.run(
        [sys.executable, "-c", _READER, str(directory), str(dim)],
        check=True,
        capture_output=True,
        text=True,
    )
    return {
        "spans": n,
        "writer_s": round(write_s, 1),
        "index_saved_spans": sum(m["ntotal"] for m in manifests),
        **json.loads(reader.stdout),
    }


def bench_prefix_search(directory: Path, dim: int, count: int, spans: int, queries: int) -> dict:
    """Search over a prefix of `count` namespaces of `spans` spans each (unfiltered, and
    filtered to half of the documents), beside a search of one of those namespaces and of one
    namespace holding as many spans as all of them (the cost of one index of that size; its
    documents filtered alike).
    Recall@10 of the prefix searches and of the one index is against brute force over the
    same vectors (those of the filter's documents when filtered)."""
    total = count * spans
    vectors = clustered_vectors(total, dim, seed=5)
    asked = clustered_vectors(queries, dim, seed=6)
    half = np.zeros(total, dtype=bool)  # rows of the documents the filter keeps

    def records(first: int) -> list[DocumentRecord]:
        for d in range(0, spans // 10):
            half[first + d * 10 : first + d * 10 + 10] = (first + d) % 2 == 0
        return [
            DocumentRecord(
                id=f"doc-{first + d}",
                metadata={"half": (first + d) % 2 == 0},
                spans=[
                    SpanRecord(s, 0, 1, "span", 1, None, vectors[first + d * 10 + s])
                    for s in range(10)
                ],
            )
            for d in range(0, spans // 10)
        ]

    def timed(store: MemoryStore, prefix: tuple[str, ...], filter_=None, rows=None, ids=None):
        """Latency percentiles; with the brute-force candidates' `rows` and the span `ids` of
        every row, recall@10 too."""
        store.search(asked[0], 10, namespace=prefix, filter=filter_)  # load and merge first
        seconds, found = [], []
        for q in asked:
            started = time.perf_counter()
            hits = store.search(q, 10, namespace=prefix, filter=filter_)
            seconds.append(time.perf_counter() - started)
            found.append({hit.span_id for hit in hits})
        out: dict = percentiles(seconds)
        if rows is not None:
            exact = rows[np.argsort(-(vectors[rows] @ asked.T), axis=0)[:10].T]
            hits = [len(f & set(ids[e].tolist())) / 10 for f, e in zip(found, exact, strict=True)]
            out["recall_at_10"] = round(float(np.mean(hits)), 4)
        return out

    every = np.arange(total)
    with MemoryStore.open(directory / "many", dim=dim) as store:
        started = time.perf_counter()
        added = []
        for i in range(count):
            added += store.add(records(i * spans), namespace=("tenants", f"t{i}"))
        add_s = time.perf_counter() - started
        span_ids = np.concatenate([np.asarray(a.span_ids, np.int64) for a in added])  # by row
        started = time.perf_counter()
        store.search(asked[0], 10, namespace=("tenants",))
        first_s = time.perf_counter() - started
        result = {
            "namespaces": count,
            "spans_per_namespace": spans,
            "add_s": round(add_s, 1),
            "prefix_first_search_s": round(first_s, 2),
            "prefix_view_kind": store._index._views[("tenants",)].index.kind,
            "prefix_search": timed(store, ("tenants",), rows=every, ids=span_ids),
            "prefix_search_filtered_half": timed(
                store, ("tenants",), {"half": True}, rows=np.flatnonzero(half), ids=span_ids
            ),
            "one_namespace_search": timed(store, ("tenants", "t7")),
        }
    with MemoryStore.open(directory / "one", dim=dim) as store:
        added = []
        for first in range(0, total, 10_000):
            batch = [
                DocumentRecord(
                    id=f"doc-{first + d}",
                    metadata={"half": bool(half[first + d * 10])},  # the same spans kept
                    spans=[
                        SpanRecord(s, 0, 1, "span", 1, None, vectors[first + d * 10 + s])
                        for s in range(10)
                    ],
                )
                for d in range(min(10_000, total - first) // 10)
            ]
            added += store.add(batch, namespace=("one",))
        span_ids = np.concatenate([np.asarray(a.span_ids, np.int64) for a in added])
        result["one_index_of_the_same_size"] = timed(store, ("one",), rows=every, ids=span_ids)
        result["one_index_of_the_same_size_filtered_half"] = timed(
            store, ("one",), {"half": True}, rows=np.flatnonzero(half), ids=span_ids
        )
        result["one_index_kind"] = store._index.shards[next(iter(store._index.shards))].kind
    for name, one in (
        ("prefix_search", "one_index_of_the_same_size"),
        ("prefix_search_filtered_half", "one_index_of_the_same_size_filtered_half"),
    ):
        result[f"{name}_p50_ratio_to_one_index"] = round(
            result[name]["p50_ms"] / result[one]["p50_ms"], 2
        )
    return result


def bench_langgraph(directory: Path, items: int, queries: int) -> dict:
    """The LangGraph store (``ICAEMemory``) beside LangGraph's ``InMemoryStore`` on the same
    `items` (values only, unindexed, over 100 namespaces, half of them with a TTL): a filtered
    search without a query (one item matches), ``list_namespaces``, and (ours only:
    InMemoryStore keeps no TTL) a TTL sweep that finds nothing due."""
    from icmem.integrations.langgraph import ICAEMemory
    from langgraph.store.base import PutOp
    from langgraph.store.memory import InMemoryStore

    from icmem.pipeline import MemoryPipeline

    # Unindexed puts never compress or embed, so the pipeline needs no models here (a window
    # given, it does not ask the model for its length either).
    store = MemoryStore.open(directory, dim=8)
    ours = ICAEMemory(MemoryPipeline(None, store, None, window=2048))  # type: ignore[arg-type]
    reference = InMemoryStore()
    puts = [
        PutOp(
            ("users", f"u{i % 100}"),
            f"k{i}",
            {"color": ("red", "blue", "green")[i % 3], "n": i},
            index=False,
            ttl=60.0 if i % 2 else None,
        )
        for i in range(items)
    ]
    started = time.perf_counter()
    for start in range(0, items, 1_000):
        ours.batch(puts[start : start + 1_000])
    put_s = time.perf_counter() - started
    for start in range(0, items, 1_000):
        reference.batch([PutOp(*p[:3], index=False) for p in puts[start : start + 1_000]])

    def timed(call) -> dict[str, float]:
        seconds = []
        for i in range(queries):
            begun = time.perf_counter()
            call(i)
            seconds.append(time.perf_counter() - begun)
        return percentiles(seconds)

    def filtered(target):
        return lambda i: target.search(("users",), filter={"n": (i * 7919) % items}, limit=10)

    result = {
        "items": items,
        "put_items_per_s": round(items / put_s, 1),
        "filtered_search": {
            "icmem": timed(filtered(ours)),
            "in_memory_store": timed(filtered(reference)),
        },
        "list_namespaces": {
            "icmem": timed(lambda _i: ours.list_namespaces(limit=1_000)),
            "in_memory_store": timed(lambda _i: reference.list_namespaces(limit=1_000)),
        },
        "sweep_ttl": {"icmem": timed(lambda _i: ours.sweep_ttl())},
    }
    for name in ("filtered_search", "list_namespaces"):
        entry = result[name]
        entry["p50_ratio"] = round(entry["icmem"]["p50_ms"] / entry["in_memory_store"]["p50_ms"], 2)
    ours.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--slot-shape", default="128x576")
    parser.add_argument(
        "--slots-up-to", type=int, default=100_000, help="omit slots above this size"
    )
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1_024, help="spans per add call")
    parser.add_argument("--codec-spans", type=int, default=1_024)
    parser.add_argument(
        "--namespaces", type=int, default=2_000, help="namespaces of the many-namespace search"
    )
    parser.add_argument(
        "--first-search-spans",
        type=int,
        default=50_000,
        help="spans one process writes before a fresh read-only process searches (0: skip)",
    )
    parser.add_argument(
        "--langgraph-items",
        default="10000,100000",
        help="item counts of the LangGraph store comparison ('': skip)",
    )
    parser.add_argument(
        "--killed-writer-spans",
        type=int,
        default=50_000,
        help="spans a writer commits before SIGKILL; then a fresh reader searches (0: skip)",
    )
    parser.add_argument(
        "--prefix-namespaces",
        type=int,
        default=1_000,
        help="namespaces under one prefix for the prefix search (0: skip)",
    )
    parser.add_argument("--prefix-spans", type=int, default=100, help="spans per namespace")
    parser.add_argument("--workdir", default=None, help="where stores are written (a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/store_bench.json")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the sections of --out this run does not measure (a benchmark too long for "
        "one quiet window, run in parts); each part's command and load average go in 'runs'",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    shape = tuple(int(x) for x in args.slot_shape.split("x"))
    work = Path(tempfile.mkdtemp(prefix="icmem-store-bench-", dir=args.workdir))
    result = {
        "benchmark": "store",
        # Every number below was measured by this command, on a machine this loaded.
        "command": shlex.join(["python", *sys.argv]),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "dim": args.dim,
        "slot_shape": list(shape),
        "k": args.k,
        "sizes": {},
    }
    try:
        pool = slot_pool("bf16", shape)
        for n in (int(s) for s in args.sizes.split(",") if s):
            n -= n % SPANS_PER_DOCUMENT
            vectors = clustered_vectors(n, args.dim, seed=0)
            queries = clustered_vectors(args.queries, args.dim, seed=1)
            ours = bench_memory_store(
                work / f"store-{n}",
                vectors,
                queries,
                pool if n <= args.slots_up_to else None,
                args.batch,
                args.k,
            )
            shutil.rmtree(work / f"store-{n}")
            baseline = bench_langchain_faiss(vectors, queries, args.batch, args.k)
            result["sizes"][str(n)] = {
                "slots": n <= args.slots_up_to,
                "icmem_store": ours,
                "langchain_faiss": baseline,
                "search_p50_ratio": round(
                    ours["search"]["p50_ms"] / baseline["search"]["p50_ms"], 3
                ),
                "add_rate_ratio": round(ours["add_spans_per_s"] / baseline["add_spans_per_s"], 3),
            }
        if args.codec_spans:
            result["bytes_per_codec"] = bytes_per_codec(work, args.dim, shape, args.codec_spans)
        if args.namespaces:
            result["many_namespaces"] = bench_namespaces(
                work / "namespaces", args.dim, args.namespaces, args.queries
            )
        if args.prefix_namespaces:
            result["prefix_search_many_namespaces"] = bench_prefix_search(
                work / "prefix", args.dim, args.prefix_namespaces, args.prefix_spans, args.queries
            )
        if args.langgraph_items:
            result["langgraph_store"] = {
                count: bench_langgraph(work / f"langgraph-{count}", int(count), 50)
                for count in args.langgraph_items.split(",")
            }
        if args.first_search_spans:
            result["first_search_after_write"] = bench_first_search_after_write(
                work / "written", args.dim, args.first_search_spans
            )
        if args.killed_writer_spans:
            result["first_search_after_killed_writer"] = bench_first_search_after_killed_writer(
                work / "killed", args.dim, args.killed_writer_spans
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    if args.merge and out.exists():
        result = merged(json.loads(out.read_text()), result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


_RUN_KEYS = ("command", "load_average_at_start", "load_average_at_end")
_SETTINGS = ("benchmark", "dim", "slot_shape", "k", "runs")
_BY_SIZE = ("sizes", "langgraph_store")  # sections keyed by size: merged size by size


def _sections(result: dict) -> list[str]:
    return [k for k, v in result.items() if k not in (*_RUN_KEYS, *_SETTINGS) and v]


def _run(result: dict) -> dict:
    """One run's command, load averages and the sections it measured."""
    return {**{key: result.get(key) for key in _RUN_KEYS}, "sections": _sections(result)}


def merged(previous: dict, new: dict) -> dict:
    """`previous` with the sections `new` measured replaced, and `new`'s run added to `runs`
    (each run: its command, load averages and the sections it measured). Every ratio is still
    between numbers of one run: each section is measured whole by one command."""
    if previous.get("dim") != new["dim"] or previous.get("k") != new["k"]:
        raise SystemExit("--merge: --out was measured with another --dim or --k; write a new file")
    runs = previous.pop("runs", None) or [_run(previous)]
    for key in _sections(new):
        if key in _BY_SIZE:
            previous.setdefault(key, {}).update(new[key])
        else:
            previous[key] = new[key]
    runs.append(_run(new))
    return {
        **previous,
        "command": " && ".join(run["command"] for run in runs),
        "load_average_at_start": runs[0]["load_average_at_start"],
        "load_average_at_end": runs[-1]["load_average_at_end"],
        "runs": runs,
    }


if __name__ == "__main__":
    main()
