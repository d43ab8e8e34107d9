"""Ingest real folders: find the files, read their text, skip (and report) what cannot be read.

Folders hold more than clean UTF-8: HTML, PDFs, JSONL exports, files that vanish mid-run,
files in another encoding, symlinks into other trees and symlink loops. Reading never stops at
a bad file: it yields a `Skip` naming the file and the reason, and goes on. The pieces are
separate so that another driver (a Ray job, a notebook) can reuse them:

- `discover(paths)` walks the given files and folders and yields each readable candidate once;
- `read_file(path)` yields the `SourceDocument`s of one file (a JSONL file holds many);
- `read_documents(paths)` is the two together;
- `content_hash(document)` and `write_skipping_refused(write, documents, ...)` decide, for any
  driver alike, what is unchanged and what the store refuses;
- `ingest_paths(pipeline, paths)` chunks, compresses (spans of many files batched together),
  embeds and stores them, skipping documents already stored with the same content, so an
  interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from icmem.chunking import DecodeErrors, Span, chunk, read_utf8
from icmem.errors import ChunkingError, IcmemError

if TYPE_CHECKING:
    from icmem.pipeline import MemoryPipeline

# Suffix -> format. Files inside folders are taken when their suffix is listed here; a file
# named on the command line is read whatever its suffix (as UTF-8 text when it is not listed).
FORMATS: Mapping[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".rst": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".pdf": "pdf",
    ".jsonl": "jsonl",
}
DEFAULT_GLOB = "**/*"
DEFAULT_TEXT_FIELD = "text"
DEFAULT_BATCH_SPANS = 64  # spans compressed together, across documents
STAGES = ("read", "tokenize", "compress", "embed", "write")


@dataclass(frozen=True)
class ReadOptions:
    """How files are found and read."""

    glob: str = DEFAULT_GLOB  # which files to take from folders, relative to each folder
    text_field: str = DEFAULT_TEXT_FIELD  # the field of a JSONL record that holds its text
    errors: DecodeErrors = "strict"  # invalid UTF-8: skip the file, or "replace"/"ignore"
    follow_symlinks: bool = False  # follow links that lead out of the given folders


@dataclass(frozen=True)
class SourceDocument:
    """One document read from a file: its id (the path, or path#Ln for a JSONL record)."""

    document_id: str
    text: str
    metadata: dict[str, Any]
    source: str


@dataclass(frozen=True)
class Skip:
    """A file (or JSONL line) that was not ingested, and why."""

    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class ChunkedDocument:
    """A document cut into spans, ready to compress (`MemoryPipeline.store_chunked`)."""

    spans: list[Span]
    document_id: str | None
    source: str
    metadata: Mapping[str, Any]
    content_hash: str


@dataclass
class IngestReport:
    """What an ingestion did: documents stored, already stored, empty, and unreadable."""

    files: int = 0
    ingested: int = 0
    skipped: int = 0  # already stored with the same content
    empty: int = 0  # no text to compress
    spans: int = 0  # spans compressed by this run
    tokens: int = 0  # tokens in those spans
    unreadable: list[Skip] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, see STAGES

    def as_dict(self) -> dict[str, int]:
        return {"ingested": self.ingested, "skipped": self.skipped, "empty": self.empty}

    def add_unreadable(self, item: Skip, *, announce: bool) -> None:
        """Record a file or document that was not ingested; with `announce`, say so on stderr
        as it happens (above the progress bar)."""
        self.unreadable.append(item)
        if announce:
            from tqdm import tqdm

            tqdm.write(f"icmem: skipped {item.path}: {item.reason}", file=sys.stderr)

    def count_written(
        self, written: Sequence[Any], refused: Sequence[Skip], *, announce: bool
    ) -> None:
        """Add what one write stored (documents whose `spans` carry `token_count`) and what
        the store refused (see `write_skipping_refused`)."""
        for item in refused:
            self.add_unreadable(item, announce=announce)
        self.ingested += len(written)
        self.spans += sum(len(d.spans) for d in written)
        self.tokens += sum(s.token_count for d in written for s in d.spans)


class StageClock:
    """Adds the wall time of named stages into a dict (when there is one to add to)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.timings is not None:
                elapsed = time.perf_counter() - started
                self.timings[stage] = self.timings.get(stage, 0.0) + elapsed


# ----------------------------------------------------------------------------------- discovery


def discover(
    paths: Sequence[str | os.PathLike[str]],
    *,
    glob: str = DEFAULT_GLOB,
    follow_symlinks: bool = False,
) -> Iterator[Path | Skip]:
    """Yield every file to read under `paths`, each real file once, in a stable order, and a
    `Skip` for each path that cannot be walked.

    Folders are walked in name order; their files are taken when `glob` matches the path
    relative to the folder and the suffix is in `FORMATS`. A symlink is followed when its
    target lies inside one of the given paths (or always, with `follow_symlinks`); a link
    back into a folder being walked, a link to itself and a dangling link are skipped, so
    loops end.
    """
    roots = [Path(p) for p in paths]
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    seen_files: set[tuple[int, int]] = set()
    for root in roots:
        try:
            info = root.stat()
        except FileNotFoundError:
            yield Skip(str(root), "does not exist; pass files or folders")
            continue
        except OSError as exc:
            yield Skip(str(root), _os_reason(exc))
            continue
        if os.path.isdir(root):
            yield from _walk(root, real_roots, glob, follow_symlinks, seen_files)
        elif not _is_regular(info):
            yield Skip(str(root), "not a regular file (a device, pipe or socket)")
        elif _first_visit(info, seen_files):
            yield root


def _walk(
    root: Path,
    real_roots: list[Path],
    glob: str,
    follow_symlinks: bool,
    seen_files: set[tuple[int, int]],
) -> Iterator[Path | Skip]:
    # Depth-first, one stack entry per folder, with the real folders on the way down to it.
    stack: list[tuple[Path, tuple[Path, ...]]] = [(root, (Path(os.path.realpath(root)),))]
    while stack:
        folder, ancestors = stack.pop()
        try:
            with os.scandir(folder) as entries:
                ordered = sorted(entries, key=lambda e: e.name)
        except OSError as exc:
            yield Skip(str(folder), _os_reason(exc))
            continue
        subfolders = []
        for entry in ordered:
            path = Path(entry.path)
            if entry.is_symlink():
                target, problem = _link_target(path, real_roots, follow_symlinks)
                if problem:
                    yield Skip(str(path), problem)
                    continue
                assert target is not None
                if target in ancestors:
                    yield Skip(str(path), f"symlink loop: points back to {target}")
                    continue
            else:
                target = Path(os.path.realpath(path))
            try:
                is_dir = entry.is_dir()
                info = entry.stat()
            except OSError as exc:
                yield Skip(str(path), _os_reason(exc))
                continue
            if is_dir:
                subfolders.append((path, (*ancestors, target)))
                continue
            relative = path.relative_to(root).as_posix()
            if not _matches(relative, glob) or path.suffix.lower() not in FORMATS:
                continue
            if not _is_regular(info):
                yield Skip(str(path), "not a regular file (a device, pipe or socket)")
            elif _first_visit(info, seen_files):
                yield path
        stack.extend(reversed(subfolders))


def _link_target(
    link: Path, real_roots: list[Path], follow_symlinks: bool
) -> tuple[Path | None, str | None]:
    try:
        target = link.resolve(strict=True)
    except FileNotFoundError:
        return None, f"dangling symlink to {os.readlink(link)}"
    except (RuntimeError, OSError) as exc:  # RuntimeError: Python < 3.13 on a loop
        return None, f"symlink loop ({exc})"
    if not follow_symlinks and not any(target.is_relative_to(r) for r in real_roots):
        return None, (
            f"symlink to {target}, outside the given folders; pass --follow-symlinks "
            "(ReadOptions(follow_symlinks=True)) to follow it"
        )
    return target, None


def _matches(relative: str, glob: str) -> bool:
    # fnmatch's * crosses folders, so "**/*.md" also matches at the top once "**/" is dropped.
    return fnmatchcase(relative, glob) or (
        glob.startswith("**/") and fnmatchcase(relative, glob[3:])
    )


def _is_regular(info: os.stat_result) -> bool:
    import stat

    return stat.S_ISREG(info.st_mode)


def _first_visit(info: os.stat_result, seen: set[tuple[int, int]]) -> bool:
    key = (info.st_dev, info.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "vanished before it could be read"
    return f"cannot be read: {exc.strerror or exc}"


# ------------------------------------------------------------------------------------- reading


def read_file(path: Path, options: ReadOptions = ReadOptions()) -> Iterator[SourceDocument | Skip]:
    """The documents of one file, or a `Skip` saying why it (or one JSONL line) was not read."""
    kind = FORMATS.get(path.suffix.lower(), "text")
    source = str(path)
    try:
        if kind == "jsonl":
            yield from _read_jsonl(path, options)
            return
        if kind == "html":
            text, metadata = _read_html(path)
        elif kind == "pdf":
            text, metadata = _read_pdf(path)
        else:
            text, metadata = "".join(read_utf8(path, options.errors)), {}
    except OSError as exc:
        yield Skip(source, _os_reason(exc))
        return
    except (ChunkingError, _UnreadableFile) as exc:
        yield Skip(source, str(exc).removeprefix(f"{source}: "))  # the path is said once
        return
    yield SourceDocument(source, text, {"format": kind, **metadata}, source)


def read_documents(
    paths: Sequence[str | os.PathLike[str]], options: ReadOptions = ReadOptions()
) -> Iterator[SourceDocument | Skip]:
    """`discover` then `read_file`: every document under `paths`, and every skip."""
    for found in discover(paths, glob=options.glob, follow_symlinks=options.follow_symlinks):
        if isinstance(found, Skip):
            yield found
        else:
            yield from read_file(found, options)


class _UnreadableFile(IcmemError):
    """A file whose format could not be parsed (the message names the file and why)."""


def _read_jsonl(path: Path, options: ReadOptions) -> Iterator[SourceDocument | Skip]:
    field_name = options.text_field
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}#L{number}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8", errors=options.errors))
            except UnicodeDecodeError as exc:
                yield Skip(where, f"invalid UTF-8 at byte {exc.start} of the line")
                continue
            except json.JSONDecodeError as exc:
                yield Skip(where, f"not JSON: {exc.msg} at column {exc.colno}")
                continue
            text = record.get(field_name) if isinstance(record, dict) else None
            if not isinstance(text, str):
                yield Skip(
                    where,
                    f"no string field {field_name!r}; name the text field with --text-field "
                    "(ReadOptions(text_field=...))",
                )
                continue
            metadata = {"format": "jsonl", "line": number}
            yield SourceDocument(where, text, metadata, str(path))


# Elements whose text is not part of the page, and elements that end a line of text.
_HIDDEN = ("script", "style", "noscript", "template", "head")
_BLOCKS = frozenset(
    {
        *("address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt"),
        *("figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6"),
        *("header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table"),
        *("tr", "td", "th", "ul"),
    }
)


def _read_html(path: Path) -> tuple[str, dict[str, Any]]:
    """The visible text of an HTML page (lxml decodes it by its declared charset)."""
    import lxml.etree
    import lxml.html

    data = path.read_bytes()
    if not data.strip():
        return "", {}
    try:
        root = lxml.html.document_fromstring(data)
    except (lxml.etree.ParserError, ValueError) as exc:
        raise _UnreadableFile(f"not parseable as HTML: {exc}") from exc
    title = (root.findtext(".//title") or "").strip()
    for element in list(root.iter(*_HIDDEN)):
        element.drop_tree()
    for element in root.iter():
        if isinstance(element.tag, str) and element.tag in _BLOCKS:
            element.tail = "\n" + (element.tail or "")
    lines = (" ".join(line.split()) for line in root.text_content().splitlines())
    text = "\n".join(line for line in lines if line)
    return text, ({"title": title} if title else {})


def _read_pdf(path: Path) -> tuple[str, dict[str, Any]]:
    """The text layer of a PDF, page by page (a scanned PDF without one gives no text)."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise _UnreadableFile("encrypted PDF; decrypt it first")
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError) as exc:
        # pypdf reports damage in many shapes; a damaged file is skipped, not fatal.
        raise _UnreadableFile(f"damaged PDF: {type(exc).__name__}: {exc}") from exc
    return "\n\n".join(pages), {"pages": len(pages)}


# ----------------------------------------------------------------------------------- ingesting
# What every ingestion driver (this module's, icmem.distributed's Ray pipeline) decides alike.

Written = TypeVar("Written")


def content_hash(document: SourceDocument) -> str | Skip:
    """The hash a document is stored with (a re-run skips it while the hash is unchanged), or a
    `Skip` when its text is one the store cannot hold."""
    from icmem.store import content_id_of
    from icmem.store.errors import InvalidRecordError

    try:
        return content_id_of(document.text)
    except InvalidRecordError as exc:
        return Skip(document.document_id, str(exc))


def write_skipping_refused(
    write: Callable[[list[Written]], object],
    documents: Sequence[Written],
    document_id: Callable[[Written], str | None],
) -> tuple[list[Written], list[Skip]]:
    """Write `documents` in one transaction; when the store refuses one (an id over 255
    characters, a character it cannot hold), write them one by one and skip only those it
    refuses. Returns the written documents and a `Skip` for each refused one."""
    from icmem.store.errors import InvalidRecordError

    try:
        write(list(documents))
        return list(documents), []
    except InvalidRecordError:
        pass
    written, refused = [], []
    for document in documents:
        try:
            write([document])
        except InvalidRecordError as exc:
            refused.append(Skip(str(document_id(document)), f"refused by the store: {exc}"))
        else:
            written.append(document)
    return written, refused


def ingest_paths(
    pipeline: MemoryPipeline,
    paths: Sequence[str | os.PathLike[str]],
    *,
    namespace: Sequence[str],
    options: ReadOptions = ReadOptions(),
    batch_spans: int = DEFAULT_BATCH_SPANS,
    progress: bool = True,
) -> IngestReport:
    """Read, chunk, compress and store every document under `paths` into `namespace`.

    Documents already stored under the same id with the same content hash are skipped, so a
    re-run only compresses what is new or changed, and an interrupted run loses at most the
    batch in flight. Unreadable files are reported in `IngestReport.unreadable` (and, with
    `progress`, as they happen).
    """
    if batch_spans < 1:
        raise ValueError(f"batch_spans={batch_spans}; use 1 or more")
    from tqdm import tqdm

    report = IngestReport()
    clock = StageClock(report.seconds)
    for stage in STAGES:
        report.seconds[stage] = 0.0
    found = list(discover(paths, glob=options.glob, follow_symlinks=options.follow_symlinks))
    files = [f for f in found if isinstance(f, Path)]
    for item in found:
        if isinstance(item, Skip):
            report.add_unreadable(item, announce=progress)
    report.files = len(files)
    sizes = [_size(f) for f in files]
    stored = {d.id: d.content_hash for d in pipeline.store.list_documents(namespace, exact=True)}
    taken: set[str] = set()
    batch: list[ChunkedDocument] = []
    tokenizer = pipeline.icae.tokenizer
    span_tokens = pipeline.icae.config.span_tokens

    bar = tqdm(desc="ingesting", unit="span", disable=not progress, dynamic_ncols=True)

    def write(documents: list[ChunkedDocument]) -> None:
        pipeline.store_chunked(documents, namespace=namespace, timings=report.seconds)

    def flush() -> None:
        if not batch:
            return
        written, refused = write_skipping_refused(write, batch, lambda d: d.document_id)
        report.count_written(written, refused, announce=progress)
        bar.update(sum(len(d.spans) for d in batch))
        batch.clear()

    try:
        done_bytes, total_bytes = 0, max(1, sum(sizes))
        for path, size in zip(files, sizes, strict=True):
            with clock("read"):
                documents = list(read_file(path, options))
            for document in documents:
                if isinstance(document, Skip):
                    report.add_unreadable(document, announce=progress)
                    continue
                if document.document_id in taken:
                    continue
                taken.add(document.document_id)
                digest = content_hash(document)
                if isinstance(digest, Skip):
                    report.add_unreadable(digest, announce=progress)
                    continue
                if stored.get(document.document_id) == digest:
                    report.skipped += 1
                    continue
                with clock("tokenize"):
                    spans = chunk(document.text, tokenizer, span_tokens=span_tokens)
                if not spans:
                    report.empty += 1
                    continue
                batch.append(
                    ChunkedDocument(
                        spans, document.document_id, document.source, document.metadata, digest
                    )
                )
                if sum(len(d.spans) for d in batch) >= batch_spans:
                    flush()
            done_bytes += size
            # Spans still to come, estimated from the bytes read so far: gives the bar an ETA.
            pending = bar.n + sum(len(d.spans) for d in batch)
            if pending:
                bar.total = max(pending, round(pending * total_bytes / max(1, done_bytes)))
                bar.refresh()
        flush()
    finally:
        bar.close()
    return report


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
