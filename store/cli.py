"""`icmem store ...`: inspect and repair a memory store from the shell.

The lead's CLI wires this in with ``from icmem.store.cli import register; register(commands)``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from .memory_store import MemoryStore

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``store stats|namespaces|reindex`` to an argparse subparsers object."""
    store_cmd = subparsers.add_parser("store", help="inspect or repair a memory store")
    actions = store_cmd.add_subparsers(title="actions", metavar="ACTION", required=True)
    for name, func, text in (
        ("stats", stats_command, "counts and bytes on disk, as JSON"),
        ("namespaces", namespaces_command, "list (tenant, agent, thread) namespaces"),
        ("reindex", reindex_command, "rebuild the FAISS index from the rows"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("store", help="store directory or SQLAlchemy URL")
        action.add_argument("--dim", type=int, required=True, help="embedding dimension")
        action.add_argument("--index-dir", default=None, help="index files (URL stores only)")
        action.add_argument("--namespace", default=None, help="tenant[/agent[/thread]] prefix")
        if name == "stats":
            action.add_argument(
                "--check",
                action="store_true",
                help="also read every row and list damaged slots, embeddings and pages "
                "(exit status 1 when any are found)",
            )
        action.set_defaults(func=func)


def _open(args: argparse.Namespace, *, read_only: bool) -> MemoryStore:
    return MemoryStore.open(args.store, dim=args.dim, index_dir=args.index_dir, read_only=read_only)


def _prefix(args: argparse.Namespace) -> tuple[str, ...] | None:
    return tuple(args.namespace.split("/")) if args.namespace else None


def stats_command(args: argparse.Namespace) -> int:
    with _open(args, read_only=True) as store:
        stats = store.stats(_prefix(args))
        report = {**asdict(stats), "bytes_on_disk": stats.bytes_on_disk}
        check = store.check(_prefix(args)) if args.check else None
    if check is not None:
        report["check"] = {**asdict(check), "ok": check.ok}
    print(json.dumps(report))
    return 0 if check is None or check.ok else 1


def namespaces_command(args: argparse.Namespace) -> int:
    with _open(args, read_only=True) as store:
        for namespace in store.list_namespaces(_prefix(args)):
            print("/".join(namespace))
    return 0


def reindex_command(args: argparse.Namespace) -> int:
    with _open(args, read_only=False) as store:
        spans = store.rebuild_index()
    print(json.dumps({"reindexed_spans": spans}))
    return 0
