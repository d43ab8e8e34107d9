"""`icmem chunk|ingest|ask|chat|demo`: put documents into memory and answer from it."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from icmem.chat import DEFAULT_RECENT_TURNS
from icmem.chunking import DEFAULT_SPAN_TOKENS
from icmem.cli.options import (
    add_decoding_options,
    add_pipeline_options,
    apply_decoding_options,
    namespace,
    open_pipeline,
    stats_dict,
)
from icmem.errors import ConversationError, IcmemError
from icmem.ingest import DEFAULT_GLOB, DEFAULT_TEXT_FIELD, FORMATS
from icmem.memory_forms import MEMORY_FORMS
from icmem.models import DEFAULT_MODEL
from icmem.writing import DEFAULT_BATCH_SPANS

if TYPE_CHECKING:
    from icmem.chat import ChatSession
    from icmem.distributed import ModelLoader
    from icmem.ingest import IngestReport, ReadOptions
    from icmem.store import SearchHit, StoreStats

DECODE_ERRORS = ("strict", "replace", "ignore")
DEFAULT_K = 4  # spans recalled per question
DEFAULT_MAX_NEW_TOKENS = 128


def chunk_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a UTF-8 text file")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="tokenizer to count with")
    parser.add_argument("--span-tokens", type=int, default=DEFAULT_SPAN_TOKENS)
    parser.add_argument("--overlap", type=int, default=0)
    parser.add_argument("--errors", choices=DECODE_ERRORS, default="strict")
    parser.add_argument("--json", action="store_true", help="one JSON object per span")


def chunk(args: argparse.Namespace) -> int:
    from icmem.chunking import chunk_file
    from icmem.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    spans = chunk_file(
        args.file, tokenizer, span_tokens=args.span_tokens, overlap=args.overlap, errors=args.errors
    )
    for span in spans:
        if args.json:
            record = {
                "index": span.index,
                "char_start": span.char_start,
                "char_end": span.char_end,
                "token_count": span.token_count,
                "content_id": span.content_id,
                "token_ids": list(span.token_ids),
                "text": span.text,
            }
            print(json.dumps(record, ensure_ascii=False))
        else:
            preview = span.text[:60].replace("\n", " ")
            print(
                f"{span.index:5d} chars {span.char_start}-{span.char_end} "
                f"tokens {span.token_count:4d}  {preview}"
            )
    return 0


def ingest_options(parser: argparse.ArgumentParser) -> None:
    suffixes = " ".join(sorted(FORMATS))
    parser.add_argument(
        "paths", nargs="+", help=f"files or folders (taken from folders: {suffixes})"
    )
    add_pipeline_options(parser)
    parser.add_argument(
        "--glob", default=DEFAULT_GLOB, help="which files to take from folders (default: all)"
    )
    parser.add_argument(
        "--errors",
        choices=DECODE_ERRORS,
        default="strict",
        help="invalid UTF-8: skip the file (strict) or substitute U+FFFD / drop the bytes",
    )
    parser.add_argument(
        "--text-field", default=DEFAULT_TEXT_FIELD, help="the text field of JSONL records"
    )
    parser.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="follow symlinks that lead out of the given folders",
    )
    parser.add_argument(
        "--batch-spans",
        type=positive_int,
        default=DEFAULT_BATCH_SPANS,
        help="spans (from any number of files) compressed and committed together; a larger "
        "document is committed in parts of this size (one process)",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        type=ray_address,
        metavar="ADDRESS",
        help='read, compress and embed on Ray workers (pip install "icmem[ray]"): a cluster\'s '
        "address (auto, HOST:PORT, ray://HOST:PORT), or none to join the local cluster or start "
        "a local instance; put it after the paths, or write --ray=ADDRESS",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="Ray workers, each loading the models once (default: one per GPU, else per CPU)",
    )


def ray_address(value: str) -> str:
    """A Ray address, refused when it looks like a path that `--ray` swallowed by mistake."""
    if value in ("", "auto", "local") or "://" in value or _HOST_PORT.fullmatch(value):
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r} is not a Ray address (auto, local, HOST:PORT or ray://HOST:PORT); if it is a "
        "path to ingest, put --ray after the paths or write --ray=ADDRESS"
    )


_HOST_PORT = re.compile(r"[\w.\-]+:\d+|\[[0-9A-Fa-f:.]+\]:\d+")


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return number


def ingest(args: argparse.Namespace) -> int:
    """Exit status 0 when every file was ingested (or already stored, or is of a format not read:
    the summary's `unsupported` lists those), 1 when some could not be read: the summary's
    `unreadable` lists each with its reason."""
    from icmem.ingest import ReadOptions

    options = ReadOptions(
        glob=args.glob,
        text_field=args.text_field,
        errors=args.errors,
        follow_symlinks=args.follow_symlinks,
    )
    if args.ray is None:
        if args.workers is not None:
            raise IcmemError("--workers sets the number of Ray workers; add --ray to use Ray")
        report, stats = _ingest_here(args, options)
    else:
        report, stats = _ingest_on_ray(args, options)
    summary = {
        "files": report.files,
        **report.as_dict(),
        "unreadable": [skip.as_dict() for skip in report.unreadable],
        "unsupported": [skip.as_dict() for skip in report.unsupported],
        **stats_dict(stats),
    }
    print(json.dumps(summary, ensure_ascii=False))
    return 1 if report.unreadable else 0


def _ingest_here(args: argparse.Namespace, options: ReadOptions) -> tuple[IngestReport, StoreStats]:
    with open_pipeline(args, create=True) as pipeline:
        report = pipeline.ingest_files(
            args.paths, namespace=args.namespace, options=options, batch_spans=args.batch_spans
        )
        return report, pipeline.stats(args.namespace)


def ray_models(args: argparse.Namespace) -> ModelLoader:
    """What each Ray worker loads: the ICAE of --checkpoint and the default embedder."""
    from icmem.distributed import DefaultModels

    return DefaultModels(icae=args.checkpoint)


def _ingest_on_ray(
    args: argparse.Namespace, options: ReadOptions
) -> tuple[IngestReport, StoreStats]:
    from icmem.distributed import ingest_with_ray
    from icmem.store import MemoryStore

    models = ray_models(args)
    report = ingest_with_ray(
        args.paths,
        args.store,
        namespace=args.namespace,
        models=models,
        index_dir=args.index_dir,
        options=options,
        address=args.ray or None,
        num_workers=args.workers,
        verbose=args.verbose,
    )
    with MemoryStore.open(
        args.store, dim=models.embedding_dim(), index_dir=args.index_dir
    ) as store:
        return report, store.stats(args.namespace)


def ask_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question")
    add_pipeline_options(parser)
    parser.add_argument("-k", type=int, default=DEFAULT_K, help="spans to recall")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    add_decoding_options(parser)


def ask(args: argparse.Namespace) -> int:
    with open_pipeline(args) as pipeline:
        apply_decoding_options(pipeline, args)
        answer = pipeline.ask(
            args.question, namespace=args.namespace, k=args.k, max_new_tokens=args.max_new_tokens
        )
    print(answer.text)
    _print_sources(answer.hits, sys.stderr)
    return 0


def chat_options(parser: argparse.ArgumentParser) -> None:
    add_pipeline_options(parser, namespace_help="the documents to answer from (as ingested)")
    parser.add_argument(
        "--chat-namespace",
        type=namespace,
        default=None,
        help="where the conversation is remembered (default: chat/ followed by --namespace), "
        "apart from the documents",
    )
    parser.add_argument("-k", type=int, default=DEFAULT_K, help="spans to recall per turn")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument(
        "--memory",
        choices=MEMORY_FORMS,
        default="slots",
        help="decode from the recalled spans' slots, or from their text (the baseline), or "
        "answer from the model alone (none)",
    )
    parser.add_argument(
        "--recent-turns",
        type=int,
        default=DEFAULT_RECENT_TURNS,
        help="messages the model reads verbatim; older ones come back through recall",
    )
    parser.add_argument(
        "--remember-replies",
        action="store_true",
        help="remember the model's replies too, not only what you say (empty ones never)",
    )
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument(
        "--greedy",
        action="store_true",
        help="plain greedy decoding (exact, repeatable) instead of light sampling with "
        "repetition penalty and loop stopping",
    )
    parser.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    add_decoding_options(parser)


CHAT_HELP = (
    "/sources: what the last answer recalled; /forget: delete this conversation's remembered "
    "turns (documents stay); /exit"
)


def chat(args: argparse.Namespace) -> int:
    """Read one message a line from stdin and answer each on stdout (prompts only on a
    terminal, so it works in a pipe). Answers come from --namespace's documents or from the
    remembered conversation (--chat-namespace), whichever matches the message better."""
    from icmem.chat import ChatSession
    from icmem.icae.decoder import CHAT_SAMPLING, GREEDY
    from icmem.store.namespaces import format_namespace

    sampling = GREEDY if args.greedy else CHAT_SAMPLING.with_overrides(seed=args.seed)
    interactive = sys.stdin.isatty()
    with open_pipeline(args) as pipeline:
        apply_decoding_options(pipeline, args)
        session = ChatSession(
            pipeline,
            args.namespace,
            conversation=args.chat_namespace,
            k=args.k,
            max_new_tokens=args.max_new_tokens,
            memory=args.memory,
            recent_turns=args.recent_turns,
            system=args.system,
            remember_replies=args.remember_replies,
            sampling=sampling,
        )
        if interactive:
            print(
                f"chatting with {args.store}: documents {format_namespace(session.documents)}, "
                f"conversation {format_namespace(session.conversation)}; {CHAT_HELP}",
                file=sys.stderr,
            )
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                break
            if text == "/sources":
                _print_chat_sources(session)
            elif text == "/forget":
                print(f"forgot {session.forget()} remembered turns")
            elif text.startswith("/"):
                print(f"unknown command {text}; {CHAT_HELP}", file=sys.stderr)
            else:
                try:
                    for piece in session.say(text):
                        sys.stdout.write(piece)
                        sys.stdout.flush()
                except ConversationError as exc:  # this message only; the chat goes on
                    print(f"icmem: {exc}", file=sys.stderr)
                    continue
                sys.stdout.write("\n")
            sys.stdout.flush()
    return 0


def _print_chat_sources(session: ChatSession) -> None:
    from icmem.store.namespaces import format_namespace

    if not session.last_hits:
        print("(no sources: the last answer came from the model alone)")
        return
    where = session.conversation if session.last_source == "conversation" else session.documents
    print(f"recalled from the {session.last_source} ({format_namespace(where)}):")
    _print_sources(session.last_hits, sys.stdout)


def _print_sources(hits: list[SearchHit], stream: TextIO) -> None:
    for hit in hits:
        print(f"  [{hit.score:.3f}] {hit.document_id} span {hit.position}", file=stream)


def demo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, help="ICAE checkpoint (default: shipped)")


DEMO_QUESTIONS = (
    "Who kept the log at Skerry Point, and for how many years?",
    "What apple variety did Martha Hollins plant first?",
)


def demo(args: argparse.Namespace) -> int:
    import tempfile

    from icmem.pipeline import MemoryPipeline

    data = resources.files("icmem").joinpath("data")
    documents = {
        name: data.joinpath(f"{name}.txt").read_text("utf-8") for name in ("lighthouse", "orchard")
    }
    with tempfile.TemporaryDirectory() as tmp:
        print("loading the default ICAE, its base model and the retrieval embedder ...")
        pipeline = MemoryPipeline.open(Path(tmp) / "store", icae=args.checkpoint, create=True)
        with pipeline:
            started = time.perf_counter()
            for name, text in documents.items():
                pipeline.ingest(text, document_id=name, source=f"icmem/data/{name}.txt")
            stats = pipeline.stats()
            print(
                f"compressed {len(documents)} documents into {stats.spans} spans in "
                f"{time.perf_counter() - started:.1f} s; store: {stats_dict(stats)}"
            )
            for question in DEMO_QUESTIONS:
                # Slots, then the same spans' text: the uncompressed baseline the slot decoder
                # is distilled from (TRAINING.md).
                for memory in ("slots", "text"):
                    answer = pipeline.ask(question, k=2, max_new_tokens=60, memory=memory)
                    sources = ", ".join(f"{h.document_id}#{h.position}" for h in answer.hits)
                    shown = answer.text.strip() or "(no answer)"
                    print(f"\nQ: {question}\nA (from memory {memory} of {sources}): {shown}")
            recalled = pipeline.recall("lighthouse keeper", k=1)
            text = pipeline.reconstruct(recalled.memory)
            print(
                f"\nreconstruction of {recalled.hits[0].document_id} span 0 from "
                f"{recalled.memory[0].num_slots} slots:\n{text[:400]}"
            )
    return 0
