"""`icmem store ...`: inspect and repair a memory store from the shell.

The lead's CLI wires this in with ``from icmem.store.cli import register; register(commands)``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from .errors import InvalidRecordError
from .memory_store import MemoryStore
from .namespaces import validate_namespace

__all__ = ["format_namespace", "parse_namespace", "register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``store stats|namespaces|reindex`` to an argparse subparsers object."""
    store_cmd = subparsers.add_parser("store", help="inspect or repair a memory store")
    actions = store_cmd.add_subparsers(title="actions", metavar="ACTION", required=True)
    for name, func, text in (
        ("stats", stats_command, "counts and bytes on disk, as JSON"),
        ("namespaces", namespaces_command, "list namespaces, one JSON array of labels a line"),
        ("reindex", reindex_command, "rebuild the FAISS index from the rows"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("store", help="store directory or SQLAlchemy URL")
        action.add_argument("--dim", type=int, required=True, help="embedding dimension")
        action.add_argument("--index-dir", default=None, help="index files (URL stores only)")
        action.add_argument(
            "--namespace",
            default=None,
            help='a namespace prefix: a JSON array of labels such as \'["users", "u/1"]\' '
            "(any label), or labels joined by '/' such as acme/bot (labels without '/')",
        )
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


def parse_namespace(text: str) -> tuple[str, ...]:
    """A namespace from the command line: a JSON array of labels (``["users", "u/1"]``, for
    labels holding ``/``, newlines or a leading ``[``) or labels joined by ``/`` (``acme/bot``)."""
    if text.startswith("["):
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRecordError(
                f"--namespace {text!r} starts with '[' but is not a JSON array of labels: {exc}"
            ) from exc
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise InvalidRecordError(
                f'--namespace {text!r} must be a JSON array of strings, such as \'["a", "b"]\''
            )
        return validate_namespace(labels, allow_prefix=True)
    return validate_namespace(text.split("/"), allow_prefix=True)


def format_namespace(namespace: tuple[str, ...]) -> str:
    """How the CLI prints a namespace: a JSON array of its labels on one line, whatever they hold
    (``parse_namespace`` reads it back)."""
    return json.dumps(list(namespace), ensure_ascii=False)


def _prefix(args: argparse.Namespace) -> tuple[str, ...] | None:
    return parse_namespace(args.namespace) if args.namespace else None


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
            print(format_namespace(namespace))
    return 0


def reindex_command(args: argparse.Namespace) -> int:
    with _open(args, read_only=False) as store:
        spans = store.rebuild_index()
    print(json.dumps({"reindexed_spans": spans}))
    return 0
