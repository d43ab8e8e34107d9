"""The `icmem` command line: subcommands are plain functions over the public API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from icmem.errors import IcmemError


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except IcmemError as exc:
        print(f"icmem: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `icmem chunk ... | head` closed our stdout; not an error
        sys.stderr.close()
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icmem", description="Compressed long memory for RAG pipelines and agents."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    chunk_cmd = commands.add_parser("chunk", help="split a UTF-8 file into token-exact spans")
    chunk_cmd.add_argument("file", help="a UTF-8 text file")
    chunk_cmd.add_argument("--model", default=_default_model(), help="tokenizer to count with")
    chunk_cmd.add_argument("--span-tokens", type=int, default=512)
    chunk_cmd.add_argument("--overlap", type=int, default=0)
    chunk_cmd.add_argument("--errors", choices=["strict", "replace", "ignore"], default="strict")
    chunk_cmd.add_argument("--json", action="store_true", help="one JSON object per span")
    chunk_cmd.set_defaults(func=chunk_command)

    ingest_cmd = commands.add_parser("ingest", help="compress files into a memory store")
    ingest_cmd.add_argument("paths", nargs="+", help="files or directories of UTF-8 text")
    _store_options(ingest_cmd)
    ingest_cmd.add_argument("--glob", default="**/*.txt", help="files to take from directories")
    ingest_cmd.add_argument("--errors", choices=["strict", "replace", "ignore"], default="strict")
    ingest_cmd.set_defaults(func=ingest_command)

    ask_cmd = commands.add_parser("ask", help="answer a question from a memory store")
    ask_cmd.add_argument("question")
    _store_options(ask_cmd)
    ask_cmd.add_argument("-k", type=int, default=4, help="spans to recall")
    ask_cmd.add_argument("--max-new-tokens", type=int, default=128)
    ask_cmd.set_defaults(func=ask_command)

    demo_cmd = commands.add_parser("demo", help="run the end-to-end demo on the default model")
    demo_cmd.add_argument("--checkpoint", default=None, help="ICAE checkpoint (default: shipped)")
    demo_cmd.set_defaults(func=demo_command)

    from icmem.evals.long_context import register_cli as register_long_context
    from icmem.evals.reconstruct import register_cli as register_reconstruct
    from icmem.icae.train import register_cli as register_train
    from icmem.store.cli import register as register_store

    eval_cmd = commands.add_parser("eval", help="evaluate long-context decoding or an ICAE")
    evaluations = eval_cmd.add_subparsers(title="evaluations", metavar="EVAL", required=True)
    register_long_context(evaluations)
    register_reconstruct(evaluations)
    register_train(commands)
    register_store(commands)
    return parser


def chunk_command(args: argparse.Namespace) -> int:
    from icmem.chunking import chunk_file
    from icmem.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    spans = chunk_file(
        args.file,
        tokenizer,
        span_tokens=args.span_tokens,
        overlap=args.overlap,
        errors=args.errors,
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


def ingest_command(args: argparse.Namespace) -> int:
    files = _collect_files(args.paths, args.glob)
    with _open_pipeline(args) as pipeline:
        report = pipeline.ingest_files(files, namespace=args.namespace, errors=args.errors)
        stats = pipeline.store.stats(args.namespace)
    print(json.dumps({"files": len(files), **report.as_dict(), **_stats_dict(stats)}))
    return 0


def ask_command(args: argparse.Namespace) -> int:
    with _open_pipeline(args) as pipeline:
        answer = pipeline.ask(
            args.question, namespace=args.namespace, k=args.k, max_new_tokens=args.max_new_tokens
        )
    print(answer.text)
    for hit in answer.hits:
        print(f"  [{hit.score:.3f}] {hit.document_id} span {hit.position}", file=sys.stderr)
    return 0


DEMO_QUESTIONS = (
    "Who kept the log at Skerry Point, and for how many years?",
    "What apple variety did Martha Hollins plant first?",
)


def demo_command(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from icmem.pipeline import MemoryPipeline

    data = resources.files("icmem").joinpath("data")
    documents = {
        name: data.joinpath(f"{name}.txt").read_text("utf-8") for name in ("lighthouse", "orchard")
    }
    with tempfile.TemporaryDirectory() as tmp:
        print("loading the default ICAE, its base model and the retrieval embedder ...")
        pipeline = MemoryPipeline.open(Path(tmp) / "store", icae=args.checkpoint)
        with pipeline:
            started = time.perf_counter()
            for name, text in documents.items():
                pipeline.ingest(text, document_id=name, source=f"icmem/data/{name}.txt")
            stats = pipeline.store.stats()
            print(
                f"compressed {len(documents)} documents into {stats.spans} spans in "
                f"{time.perf_counter() - started:.1f} s; store: {_stats_dict(stats)}"
            )
            for question in DEMO_QUESTIONS:
                # Slots, then the same spans' text: the shipped checkpoint is trained on [AE]
                # only so far, so its slot answers lag the uncompressed baseline (TRAINING.md).
                for memory in ("slots", "text"):
                    answer = pipeline.ask(question, k=2, max_new_tokens=60, memory=memory)
                    sources = ", ".join(f"{h.document_id}#{h.position}" for h in answer.hits)
                    shown = answer.text.strip() or "(no answer)"
                    print(f"\nQ: {question}\nA (from memory {memory} of {sources}): {shown}")
            recalled = pipeline.recall("lighthouse keeper", k=1)
            text = pipeline.icae.reconstruct(recalled.memory)
            print(
                f"\nreconstruction of {recalled.hits[0].document_id} span 0 from "
                f"{recalled.memory[0].num_slots} slots:\n{text[:400]}"
            )
    return 0


def _store_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--store", required=True, help="store directory or SQLAlchemy URL")
    command.add_argument("--index-dir", default=None, help="FAISS files (for a database URL)")
    command.add_argument("--checkpoint", default=None, help="ICAE checkpoint (default: shipped)")
    command.add_argument(
        "--namespace",
        type=_namespace,
        default=("default", "default", "default"),
        help="labels joined by / (default: default/default/default), or a JSON array such as "
        '\'["users", "u/1", "notes"]\' for labels that hold /',
    )


def _namespace(value: str) -> tuple[str, ...]:
    """A namespace of any depth: labels joined by `/`, or a JSON array for labels holding `/`."""
    from icmem.store.cli import parse_namespace
    from icmem.store.errors import StoreError

    try:
        return parse_namespace(value)
    except StoreError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _open_pipeline(args: argparse.Namespace):
    from icmem.pipeline import MemoryPipeline

    return MemoryPipeline.open(args.store, icae=args.checkpoint, index_dir=args.index_dir)


def _collect_files(paths: Sequence[str], pattern: str) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.glob(pattern) if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise IcmemError(f"{path} does not exist; pass files or directories of text")
    return files


def _stats_dict(stats) -> dict[str, int]:
    return {
        "documents": stats.documents,
        "spans": stats.spans,
        "slot_bytes": stats.slot_bytes,
        "bytes_on_disk": stats.bytes_on_disk,
    }


def _default_model() -> str:
    from icmem.models import DEFAULT_MODEL

    return DEFAULT_MODEL


if __name__ == "__main__":
    sys.exit(main())
