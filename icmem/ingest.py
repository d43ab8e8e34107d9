"""Ingest real folders: find the files, read their text, skip (and report) what cannot be read.

Folders hold more than clean UTF-8: HTML, PDFs, JSONL exports, files that vanish mid-run,
files in another encoding, files of formats icmem does not read, symlinks into other trees and
symlink loops. Reading never stops at a bad file: it yields a `Skip` naming the file and the
reason, and goes on. The pieces are separate so that another driver (a Ray job, a notebook) can
reuse them:

- `discover(paths)` walks the given files and folders and yields each readable candidate once
  (and a `Skip` for each file of a format it does not read);
- `read_file(path)` yields the `TextDocument`s of one file (a JSONL file holds many);
- `read_documents(paths)` is the two together;
- `ingest_paths(paths, encoder, writer)` reads, chunks, compresses (spans of many files batched
  together), embeds and stores them (`icmem.encoding`, `icmem.writing`), skipping documents
  already stored with the same content and continuing a large document after the parts an
  interrupted run committed, so a re-run redoes nothing.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from icmem.chunking import DecodeErrors, Span, read_utf8
from icmem.documents import TextDocument
from icmem.encoding import DocumentEncoder, StageClock
from icmem.errors import ChunkingError, IcmemError
from icmem.writing import DEFAULT_BATCH_SPANS, BatchedWriter, DocumentWriter, refusal, unchanged

# Suffix -> format. Files inside folders are taken when their suffix is listed here (the others
# are reported as unsupported); a file named on the command line is read whatever its suffix (as
# UTF-8 text when it is not listed).
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
STAGES = ("read", "tokenize", "compress", "embed", "write")
KEPT_TOKENS = 1 << 22  # tokens of spans kept from the counting pass (about 200 MB at most)


@dataclass(frozen=True)
class ReadOptions:
    """How files are found and read."""

    glob: str = DEFAULT_GLOB  # which files to take from folders, relative to each folder
    text_field: str = DEFAULT_TEXT_FIELD  # the field of a JSONL record that holds its text
    errors: DecodeErrors = "strict"  # invalid UTF-8: skip the file, or "replace"/"ignore"
    follow_symlinks: bool = False  # follow links that lead out of the given folders


@dataclass(frozen=True)
class Skip:
    """A file (or JSONL line) that was not ingested, and why; `unsupported` when its format is
    one icmem does not read (not an error: the folder simply holds other files too)."""

    path: str
    reason: str
    unsupported: bool = False

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class IngestReport:
    """What an ingestion did: documents stored, already stored, empty, unreadable, and files of
    formats it does not read."""

    files: int = 0
    ingested: int = 0
    skipped: int = 0  # already stored with the same content
    empty: int = 0  # no text to compress
    spans: int = 0  # spans compressed by this run
    tokens: int = 0  # tokens in those spans
    unreadable: list[Skip] = field(default_factory=list)
    unsupported: list[Skip] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def as_dict(self) -> dict[str, int]:
        return {"ingested": self.ingested, "skipped": self.skipped, "empty": self.empty}

    def add_skip(self, item: Skip, *, announce: bool) -> None:
        """Record a file or document that was not ingested; with `announce`, say so on stderr
        as it happens (above the progress bar)."""
        (self.unsupported if item.unsupported else self.unreadable).append(item)
        if announce:
            from tqdm import tqdm

            tqdm.write(f"icmem: skipped {item.path}: {item.reason}", file=sys.stderr)


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
    relative to the folder and the suffix is in `FORMATS` (a matching file of another suffix
    is yielded as an unsupported `Skip`). A symlink is followed when its
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
            if not _matches(relative, glob):
                continue
            if path.suffix.lower() not in FORMATS:
                yield Skip(str(path), _UNSUPPORTED, unsupported=True)
            elif not _is_regular(info):
                yield Skip(str(path), "not a regular file (a device, pipe or socket)")
            elif _first_visit(info, seen_files):
                yield path
        stack.extend(reversed(subfolders))


_UNSUPPORTED = (
    "not a format icmem reads (see FORMATS, or `icmem ingest --help`); name the file itself to "
    "read it as UTF-8 text"
)


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


def read_file(path: Path, options: ReadOptions = ReadOptions()) -> Iterator[TextDocument | Skip]:
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
    yield TextDocument.from_text(text, source, source=source, metadata={"format": kind, **metadata})


def read_documents(
    paths: Sequence[str | os.PathLike[str]], options: ReadOptions = ReadOptions()
) -> Iterator[TextDocument | Skip]:
    """`discover` then `read_file`: every document under `paths`, and every skip."""
    for found in discover(paths, glob=options.glob, follow_symlinks=options.follow_symlinks):
        if isinstance(found, Skip):
            yield found
        else:
            yield from read_file(found, options)


class _UnreadableFile(IcmemError):
    """A file whose format could not be parsed (the message names the file and why)."""


def _read_jsonl(path: Path, options: ReadOptions) -> Iterator[TextDocument | Skip]:
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
            yield TextDocument.from_text(text, where, source=str(path), metadata=metadata)


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


def ingest_paths(
    paths: Sequence[str | os.PathLike[str]],
    encoder: DocumentEncoder,
    writer: DocumentWriter,
    *,
    options: ReadOptions = ReadOptions(),
    batch_spans: int = DEFAULT_BATCH_SPANS,
    progress: bool = True,
) -> IngestReport:
    """Read, chunk, compress and store every document under `paths` into `writer`'s namespace.

    A first pass reads and chunks every file to find what is new or changed and how many spans
    it holds (the progress bar's true total; its speed and ETA follow), keeping the spans of up
    to `KEPT_TOKENS` tokens; the second compresses and writes them (chunking again only what
    was not kept), `batch_spans` spans per transaction (see `icmem.writing.BatchedWriter`).
    Documents stored under the same id with the same content hash are skipped, and a large
    document continues after the parts an earlier, interrupted run committed, so Ctrl-C loses
    at most the batch in flight and a re-run redoes nothing. Unreadable files are reported in
    `IngestReport.unreadable`, files of formats not read in `IngestReport.unsupported` (with
    `progress`, both also as they happen).
    """
    from tqdm import tqdm

    report = IngestReport()
    clock = StageClock(report.seconds)
    batched = BatchedWriter(encoder, writer, batch_spans=batch_spans, timings=report.seconds)
    bar = None
    try:
        files: list[Path] = []
        for found in discover(paths, glob=options.glob, follow_symlinks=options.follow_symlinks):
            if isinstance(found, Skip):
                report.add_skip(found, announce=progress)
            else:
                files.append(found)
        report.files = len(files)
        stored = writer.stored_hashes()
        unfinished = writer.unfinished_parts()
        todo: dict[Path, set[str]] = {}  # file -> ids of its documents to write
        chunked: dict[str, tuple[str, list[Span]]] = {}  # id -> (hash, spans), kept for pass 2
        kept_tokens, total = 0, 0  # tokens of the kept spans, spans to compress
        reading = tqdm(files, desc="reading", unit="file", disable=not progress, leave=False)
        for path in reading:
            for document in _documents_of(path, options, clock, report, progress):
                leftover = writer.parts_namespace(document) in unfinished
                if unchanged(document, stored):
                    report.skipped += 1
                    if leftover:  # parts of a version that was never finished
                        writer.drop_parts(document)
                    continue
                with clock("tokenize"):
                    spans = encoder.chunk(document)
                done = 0
                if len(spans) > batch_spans:
                    done = writer.parts_done(document)
                elif leftover:  # it shrank: written whole now
                    writer.drop_parts(document)
                if not spans:
                    report.empty += 1
                    continue
                todo.setdefault(path, set()).add(str(document.document_id))
                total += len(spans) - done
                tokens = sum(span.token_count for span in spans)
                if kept_tokens + tokens <= KEPT_TOKENS:  # not chunked twice, within a budget
                    chunked[str(document.document_id)] = (document.content_hash, spans)
                    kept_tokens += tokens
        reading.close()
        bar = tqdm(
            desc="ingesting", total=total, unit="span", disable=not progress, dynamic_ncols=True
        )
        batched.on_spans = bar.update
        for path, wanted in todo.items():
            for document in _documents_of(path, options, clock, None, progress):
                if document.document_id in wanted:
                    wanted.discard(document.document_id)
                    digest, spans = chunked.pop(document.document_id, ("", []))
                    if digest != document.content_hash:  # not kept, or changed since
                        with clock("tokenize"):
                            spans = encoder.chunk(document)
                    batched.add(document, spans)
            for gone in sorted(wanted):  # changed since the first pass into something unreadable
                report.add_skip(Skip(gone, "could not be read again"), announce=progress)
        batched.flush()
    finally:
        if bar is not None:
            bar.close()
        report.ingested, report.spans, report.tokens = (
            len(batched.added),
            batched.spans,
            batched.tokens,
        )
    return report


def _documents_of(
    path: Path,
    options: ReadOptions,
    clock: StageClock,
    report: IngestReport | None,
    announce: bool,
) -> Iterator[TextDocument]:
    """The documents of one file that the store can hold; what cannot be read or would be
    refused goes to `report` (when there is one)."""
    with clock("read"):
        documents = list(read_file(path, options))
    for document in documents:
        if isinstance(document, TextDocument):
            reason = refusal(document)
            if reason is None:
                yield document
                continue
            document = Skip(document.name, f"refused by the store: {reason}")
        if report is not None:
            report.add_skip(document, announce=announce)
