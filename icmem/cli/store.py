"""`icmem store stats|namespaces|reindex`: inspect and repair a memory store from the shell."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from icmem.store import MemoryStore


def store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="store directory or SQLAlchemy URL")
    parser.add_argument("--dim", type=int, required=True, help="embedding dimension")
    parser.add_argument("--index-dir", default=None, help="index files (URL stores only)")
    parser.add_argument(
        "--namespace",
        default=None,
        help='a namespace prefix: a JSON array of labels such as \'["users", "u/1"]\' '
        "(any label), or labels joined by '/' such as acme/bot (labels without '/')",
    )


def stats_options(parser: argparse.ArgumentParser) -> None:
    store_options(parser)
    parser.add_argument(
        "--check",
        action="store_true",
        help="also read every row and list damaged slots, embeddings and pages "
        "(exit status 1 when any are found)",
    )


def stats(args: argparse.Namespace) -> int:
    with _open(args, read_only=True) as store:
        counts = store.stats(_prefix(args))
        report = {**asdict(counts), "bytes_on_disk": counts.bytes_on_disk}
        check = store.check(_prefix(args)) if args.check else None
    if check is not None:
        report["check"] = {**asdict(check), "ok": check.ok}
    print(json.dumps(report))
    return 0 if check is None or check.ok else 1


def namespaces(args: argparse.Namespace) -> int:
    from icmem.store.namespaces import format_namespace

    with _open(args, read_only=True) as store:
        for namespace in store.list_namespaces(_prefix(args)):
            print(format_namespace(namespace))
    return 0


def reindex(args: argparse.Namespace) -> int:
    with _open(args, read_only=False) as store:
        spans = store.rebuild_index()
    print(json.dumps({"reindexed_spans": spans}))
    return 0


def _open(args: argparse.Namespace, *, read_only: bool) -> MemoryStore:
    from icmem.store import MemoryStore

    return MemoryStore.open(args.store, dim=args.dim, index_dir=args.index_dir, read_only=read_only)


def _prefix(args: argparse.Namespace) -> tuple[str, ...] | None:
    from icmem.store.namespaces import parse_namespace

    return parse_namespace(args.namespace) if args.namespace else None
