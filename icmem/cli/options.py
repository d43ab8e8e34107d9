"""Options and value types that several subcommands share."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from icmem.pipeline import MemoryPipeline
    from icmem.store import StoreStats

DEFAULT_NAMESPACE_TEXT = "default/default/default"


def namespace(value: str) -> tuple[str, ...]:
    """A namespace of any depth: labels joined by `/`, or a JSON array for labels holding `/`."""
    from icmem.store.errors import StoreError
    from icmem.store.namespaces import parse_namespace

    try:
        return parse_namespace(value)
    except StoreError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_pipeline_options(
    parser: argparse.ArgumentParser, *, namespace_help: str = "where to read and write"
) -> None:
    """Where the memory lives and which ICAE reads and writes it."""
    parser.add_argument("--store", required=True, help="store directory or SQLAlchemy URL")
    parser.add_argument("--index-dir", default=None, help="FAISS files (for a database URL)")
    parser.add_argument("--checkpoint", default=None, help="ICAE checkpoint (default: shipped)")
    parser.add_argument(
        "--namespace",
        type=namespace,
        default=DEFAULT_NAMESPACE_TEXT,
        help=f"{namespace_help}: labels joined by / (default: {DEFAULT_NAMESPACE_TEXT}), or a "
        "JSON array such as "
        '\'["users", "u/1", "notes"]\' for labels that hold /',
    )


def add_decoding_options(parser: argparse.ArgumentParser) -> None:
    """How the commands that answer decode."""
    parser.add_argument(
        "--int8-decoder",
        action="store_true",
        help="decode with weight-only int8 copies of the decoder (1.4-1.5x the tokens/s on a "
        "2-core CPU; answers differ slightly from the exact float decoder's)",
    )


def apply_decoding_options(pipeline: MemoryPipeline, args: argparse.Namespace) -> None:
    pipeline.icae.decoder.int8_weights = args.int8_decoder


def open_pipeline(
    args: argparse.Namespace, *, create: bool = False, **options: Any
) -> MemoryPipeline:
    """The pipeline over --store; only `icmem ingest` creates a store (`create=True`), every
    other command refuses a path that holds none, naming it."""
    from icmem.pipeline import MemoryPipeline

    return MemoryPipeline.open(
        args.store, icae=args.checkpoint, index_dir=args.index_dir, create=create, **options
    )


def stats_dict(stats: StoreStats) -> dict[str, int]:
    return {
        "documents": stats.documents,
        "spans": stats.spans,
        "slot_bytes": stats.slot_bytes,
        "bytes_on_disk": stats.bytes_on_disk,
    }
