"""Ingestion scaled out on Ray: read, chunk, compress and embed on a pool of workers.

The expensive part of ingestion (the ICAE forward and the embedder) runs in a Ray Data pipeline
whose compress stage is an actor pool: each actor loads the models once and then encodes
document after document. Only the driver writes to the store, in batched transactions, so a
SQLite store (one writer) works as well as Postgres, and a crash loses at most the batch in
flight. The write path is the single-process one: files are found and read by `icmem.ingest`
(`discover`, `read_file`), unchanged and refused documents are decided by `icmem.writing`
(`unchanged`, `refusal`), each document is encoded by `icmem.encoding.DocumentEncoder` and
written by `icmem.writing.DocumentWriter`, so the store ends up with what a single-process run
writes and the same files are reported skipped.

Ray is an optional dependency (`pip install "icmem[ray]"`); it is imported when called.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from icmem.chunking import Span
from icmem.documents import DEFAULT_NAMESPACE, TextDocument
from icmem.encoding import DocumentEncoder, StageClock
from icmem.errors import IcmemError
from icmem.ingest import IngestReport, ReadOptions, Skip, discover, read_file
from icmem.store.namespaces import validate_namespace
from icmem.writing import DocumentWriter, refusal, unchanged

if TYPE_CHECKING:
    from icmem.embedding import TextEmbedder
    from icmem.icae.model import ICAE

# What a row is after the read stage, and what the driver does with it.
_ENCODE, _SKIPPED, _EMPTY, _UNREADABLE = "encode", "skipped", "empty", "unreadable"
# The stages the workers time, one column of seconds each; the driver times "write".
_WORKER_STAGES = ("read", "tokenize", "compress", "embed")


class DistributedIngestError(IcmemError):
    """Ray is missing, or the inputs of a distributed ingestion are unusable."""


class ModelLoader(Protocol):
    """What each worker calls once to get its models; must pickle (it travels to the workers)."""

    def load(self) -> tuple[ICAE, TextEmbedder]: ...

    def embedding_dim(self) -> int: ...


@dataclass(frozen=True)
class DefaultModels:
    """The ICAE checkpoint (None: the shipped one) and embedder `MemoryPipeline.open` loads."""

    icae: str | None = None
    embedder: str | None = None
    dtype: str | None = None

    def load(self) -> tuple[ICAE, TextEmbedder]:
        from icmem.embedding import DEFAULT_EMBEDDER, TextEmbedder
        from icmem.icae.model import ICAE

        icae = ICAE.from_pretrained(self.icae, dtype=self.dtype)
        return icae, TextEmbedder.load(self.embedder or DEFAULT_EMBEDDER)

    def embedding_dim(self) -> int:
        from icmem.embedding import DEFAULT_EMBEDDER, embedding_dim

        return embedding_dim(self.embedder or DEFAULT_EMBEDDER)


class _DocumentEncoder:
    """The actor-pool stage: chunk, compress and embed each document of a batch."""

    def __init__(self, models: ModelLoader, codec: str, batch_size: int) -> None:
        import torch

        icae, embedder = models.load()
        if torch.cuda.is_available():  # the actor was given a GPU; the embedder stays on CPU
            icae.to("cuda")
        self.encoder = DocumentEncoder(icae, embedder, codec=codec, batch_size=batch_size)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Chunk every document of the batch, then compress and embed all their spans together
        (many small documents still fill the ICAE's batches)."""
        import numpy as np

        statuses = list(batch["status"])
        seconds = {stage: [float(t) for t in batch[stage]] for stage in _WORKER_STAGES}
        timings = {"tokenize": 0.0, "compress": 0.0, "embed": 0.0}
        chunked: dict[int, tuple[TextDocument, list[Span]]] = {}
        for i, status in enumerate(statuses):
            if status != _ENCODE:
                continue
            document = _document_of(batch["document"][i])
            with StageClock(timings)("tokenize"):
                spans = self.encoder.chunk(document)
            if not spans:
                statuses[i] = _EMPTY
                continue
            chunked[i] = (document, spans)
        encoded = self.encoder.encode(list(chunked.values()), timings=timings)
        records = np.empty(len(statuses), dtype=object)
        for i, record in zip(chunked, encoded, strict=True):
            records[i] = record
        for stage, spent in timings.items():  # the batch's time, on its first row
            seconds[stage][0] += spent
        return {
            "status": np.array(statuses),
            "record": records,
            "id": np.array([str(i) for i in batch["id"]]),
            "reason": np.array([str(r) for r in batch["reason"]]),
            **{stage: np.array(spent, dtype=np.float64) for stage, spent in seconds.items()},
        }


def _document_row(document: TextDocument) -> str:
    """A document as one column of a Ray row (JSON: Ray Data keeps columns of plain values)."""
    fields = [document.document_id, list(document.texts), dict(document.metadata)]
    return json.dumps([*fields, document.source], ensure_ascii=False)


def _document_of(row: str) -> TextDocument:
    document_id, texts, metadata, source = json.loads(row)
    return TextDocument(document_id, tuple(texts), metadata, source)


def _read_stage(stored: Mapping[str, str], options: ReadOptions):
    """Reads a file's documents as single-process ingestion does (`read_file`: text, HTML, PDF,
    JSONL, several per file), or takes the given document, and marks documents stored
    unchanged and those the store would refuse."""

    def read(row: dict[str, Any]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        if not row["path"]:
            documents: list[TextDocument | Skip] = [_document_of(row["document"])]
        else:
            documents = list(read_file(Path(row["path"]), options))
        out: list[dict[str, Any]] = []
        for document in documents:
            if isinstance(document, TextDocument):
                reason = refusal(document)
                if reason is not None:
                    document = Skip(document.name, f"refused by the store: {reason}")
            if isinstance(document, Skip):
                out.append({**_UNREADABLE_ROW, "id": document.path, "reason": document.reason})
                continue
            status = _SKIPPED if unchanged(document, stored) else _ENCODE
            out.append(
                {
                    "id": document.document_id,
                    "document": _document_row(document),
                    "status": status,
                    "reason": "",
                }
            )
        # The file's read time goes to its first document (a JSONL file has many).
        for row_out in out:
            row_out.update(dict.fromkeys(_WORKER_STAGES, 0.0))
        if out:
            out[0]["read"] = time.perf_counter() - started
        return out

    return read


_UNREADABLE_ROW = {"document": "", "status": _UNREADABLE}


def _rows(
    sources: Sequence[str | os.PathLike[str] | TextDocument], options: ReadOptions
) -> tuple[list[dict[str, Any]], list[Skip]]:
    """One row per file found under the paths (as `icmem.ingest.discover` finds them) and per
    `TextDocument`, and what discovery skipped."""
    rows, skips, seen = [], [], set()
    paths: list[str | os.PathLike[str]] = []
    for source in sources:
        if isinstance(source, TextDocument):
            if source.document_id is None:
                raise DistributedIngestError(
                    "a TextDocument given to ingest_with_ray needs a document_id (a re-run "
                    "finds it by its id)"
                )
            rows.append({"path": "", "id": source.document_id, "document": _document_row(source)})
        elif isinstance(source, (str, os.PathLike)):
            paths.append(source)
        else:
            raise DistributedIngestError(
                f"cannot ingest {type(source).__name__}; pass file or folder paths, or "
                "TextDocument objects"
            )
    for found in discover(paths, glob=options.glob, follow_symlinks=options.follow_symlinks):
        if isinstance(found, Skip):
            skips.append(found)
            continue
        rows.append({"path": str(found), "id": str(found), "document": ""})
    for row in rows:
        if row["id"] in seen:
            raise DistributedIngestError(
                f"document id {row['id']!r} is given twice; each document needs its own id"
            )
        seen.add(row["id"])
    return rows, skips


def ingest_with_ray(
    sources: Sequence[str | os.PathLike[str] | TextDocument],
    store: str | os.PathLike[str],
    *,
    namespace: Sequence[str] = DEFAULT_NAMESPACE,
    models: ModelLoader | None = None,
    index_dir: str | os.PathLike[str] | None = None,
    codec: str = "bf16",
    batch_size: int = 8,
    batch_documents: int = 8,
    write_batch: int = 16,
    options: ReadOptions | None = None,
    address: str | None = None,
    num_workers: int | None = None,
    use_gpu: bool | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> IngestReport:
    """Ingest files and folders (as `icmem.ingest.ingest_paths`: ids are paths, `options` says
    which files and how to read them, default `ReadOptions()`) and `TextDocument`s on Ray.

    `address` is a running cluster's (`"auto"`, `"ray://head:10001"`); None starts or joins a
    local instance. `num_workers` actors (default: one per GPU, or one per CPU) each load the
    models of `models` (default: the shipped ICAE and all-MiniLM-L6-v2) once, then take
    `batch_documents` documents at a time and compress their spans together, `batch_size` spans
    per forward pass. The driver writes
    `write_batch` documents per transaction to `store` (a directory or an SQLAlchemy URL).
    Resumable: a document already stored with the same content is skipped. Files that vanish,
    cannot be decoded or lie outside the given folders are skipped and listed in the report's
    `unreadable`, files of formats not read in its `unsupported` (with `progress`, both also on
    stderr as they happen). The arguments, the namespace first, are checked before any work.
    The report's `seconds` are summed over the workers (their shares, not wall time); "write"
    is the driver's. Ray's own INFO logs and the workers' output (library warnings) are shown
    only when `verbose`.
    """
    try:
        import ray
    except ImportError as exc:
        raise DistributedIngestError(
            'distributed ingestion needs Ray: pip install "icmem[ray]"'
        ) from exc
    from icmem.store import MemoryStore

    namespace = validate_namespace(namespace)
    sizes: dict[str, int | None] = {"write_batch": write_batch, "batch_size": batch_size}
    sizes |= {"batch_documents": batch_documents, "num_workers": num_workers}
    bad = [f"{name}={size}" for name, size in sizes.items() if size is not None and size < 1]
    if bad:
        raise DistributedIngestError(f"{', '.join(bad)}: use 1 or more")
    models = models or DefaultModels()
    options = options or ReadOptions()
    rows, skips = _rows(sources, options)
    report = IngestReport(files=sum(1 for row in rows if row["path"]))
    for item in skips:
        report.add_skip(item, announce=progress)
    if not ray.is_initialized():
        ray.init(
            address=address,
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.WARNING,
        )
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if use_gpu is None:
        use_gpu = gpus > 0
    if num_workers is None:
        num_workers = gpus if use_gpu else max(1, int(resources.get("CPU", 1)))

    with MemoryStore.open(store, dim=models.embedding_dim(), index_dir=index_dir) as opened:
        if not rows:
            return report
        writer = DocumentWriter(opened, namespace)
        stored = writer.stored_hashes()
        context = ray.data.DataContext.get_current()
        saved = (
            context.execution_options.preserve_order,
            context.enable_progress_bars,
            context.print_on_execution_start,
        )
        context.execution_options.preserve_order = True  # same ids and order as one process
        # Off a terminal, Ray Data logs its progress bars as blocks of INFO lines.
        context.enable_progress_bars = progress and (verbose or sys.stderr.isatty())
        context.print_on_execution_start = verbose  # the execution plan
        try:
            encoded = (
                ray.data.from_items(rows)
                .flat_map(_read_stage(stored, options), num_cpus=0)
                .map_batches(
                    _DocumentEncoder,
                    fn_constructor_kwargs={
                        "models": models,
                        "codec": codec,
                        "batch_size": batch_size,
                    },
                    batch_size=batch_documents,
                    compute=ray.data.ActorPoolStrategy(size=num_workers),
                    num_cpus=0 if use_gpu else 1,
                    num_gpus=1 if use_gpu else 0,
                )
            )
            for batch in encoded.iter_batches(batch_size=write_batch, batch_format="numpy"):
                _write(writer, batch, report, announce=progress)
        finally:
            (
                context.execution_options.preserve_order,
                context.enable_progress_bars,
                context.print_on_execution_start,
            ) = saved
    return report


def _write(
    writer: DocumentWriter, batch: dict[str, Any], report: IngestReport, *, announce: bool
) -> None:
    """One transaction for the encoded documents of a batch; counts the others."""
    records = []
    for status, record, key, reason in zip(
        batch["status"], batch["record"], batch["id"], batch["reason"], strict=True
    ):
        if status == _UNREADABLE:
            report.add_skip(Skip(str(key), str(reason)), announce=announce)
        elif status == _SKIPPED:
            report.skipped += 1
        elif status == _EMPTY:
            report.empty += 1
        else:
            records.append(record)
    for stage in _WORKER_STAGES:
        report.seconds[stage] += float(batch[stage].sum())
    with StageClock(report.seconds)("write"):
        writer.write(records)
    report.ingested += len(records)
    report.spans += sum(len(r.spans) for r in records)
    report.tokens += sum(s.token_count for r in records for s in r.spans)
