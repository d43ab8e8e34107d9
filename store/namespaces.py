"""Namespace paths: a namespace is a tuple of 1 to ``MAX_NAMESPACE_DEPTH`` labels, stored as one
encoded text column so that exact and prefix matching are plain equality tests.

Each label is written as a JSON string (which escapes every control character, quotes and
backslashes) followed by the unit separator ``\\x1f``. The code of each label is self-delimiting
and the terminator never occurs inside one, so the encoding of ``p`` is a leading substring of the
encoding of ``q`` exactly when ``p`` is a leading run of ``q``'s labels: ``("a",)`` encodes as
``"a"\\x1f`` and never prefixes ``("ab",)``'s ``"ab"\\x1f``, and ``/``, ``%``, ``_`` or newlines
in a label mean nothing (no ``LIKE`` pattern is ever built). A prefix test is
``substr(path, 1, len(prefix)) = prefix``; an exact test compares ``path_key``, the SHA-256 of the
path, which keeps the unique index small whatever the labels hold (Postgres caps b-tree entries
at about 2.7 KB; a 16-label path may be larger). So that a prefix read need not scan every
namespace, each namespace also lists the keys of all its prefixes (``prefix_keys``) in an indexed
table; the ``substr`` test stays as the definition the lookup is checked against.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence, Set

from .errors import InvalidRecordError
from .validation import MAX_KEY_CHARS, check_text

__all__ = [
    "MAX_NAMESPACE_DEPTH",
    "addressable_label",
    "decode_path",
    "encode_path",
    "format_namespace",
    "parse_namespace",
    "path_key",
    "prefix_keys",
    "validate_namespace",
]

MAX_NAMESPACE_DEPTH = 16
_TERMINATOR = "\x1f"


def encode_path(labels: Sequence[str]) -> str:
    """The stored form of a (checked) namespace or namespace prefix; ``()`` encodes as ``""``."""
    return "".join(json.dumps(label, ensure_ascii=False) + _TERMINATOR for label in labels)


@functools.lru_cache(maxsize=65_536)
def decode_path(path: str) -> tuple[str, ...]:
    """The labels of a stored path (the inverse of ``encode_path``); kept for the paths seen
    most recently, since every read decodes each namespace it covers."""
    return tuple(json.loads(code) for code in path.split(_TERMINATOR)[:-1])


def path_key(path: str) -> str:
    """The unique key of a stored path: its SHA-256, 64 hex digits."""
    return hashlib.sha256(path.encode("utf-8")).hexdigest()


def prefix_keys(labels: Sequence[str]) -> list[str]:
    """The keys of every leading run of a namespace's labels, itself included (shortest first):
    what ``icmem_namespace_prefixes`` holds for it."""
    return [path_key(encode_path(labels[:depth])) for depth in range(1, len(labels) + 1)]


def validate_namespace(namespace: Sequence[str], *, allow_prefix: bool = False) -> tuple[str, ...]:
    """Check a namespace: a tuple (or list) of 1 to ``MAX_NAMESPACE_DEPTH`` non-empty string
    labels of at most 255 characters, with no NUL or lone surrogate. Any other character is
    allowed, ``/`` and newlines included. ``allow_prefix`` only words the error: a prefix is
    checked the same way, and matches itself and every namespace below it."""
    labels = None
    # A mapping or a set iterates without a meaningful order (a dict would silently become its
    # keys), so only sequences and other ordered iterables are read as labels.
    if not isinstance(namespace, str | bytes | Mapping | Set) and isinstance(namespace, Iterable):
        labels = tuple(namespace)
    what = "a namespace prefix" if allow_prefix else "a namespace"
    if (
        labels is None
        or not 1 <= len(labels) <= MAX_NAMESPACE_DEPTH
        or not all(isinstance(label, str) and label for label in labels)
    ):
        raise InvalidRecordError(
            f"{what} must be a tuple of 1 to {MAX_NAMESPACE_DEPTH} non-empty string labels, "
            f"such as (tenant, agent, thread) or ('users', uid, 'memories'), got {namespace!r}"
        )
    for depth, label in enumerate(labels):
        check_text(label, f"namespace label {depth}", max_chars=MAX_KEY_CHARS)
    return labels


def addressable_label(label: str) -> str:
    """``label`` itself when ``validate_namespace`` accepts it, else a valid stand-in for it.

    Stores written before labels were checked may hold labels that can no longer be given to
    any call: empty, holding NUL, or longer than 255 characters. Migration renames each such
    label to its stand-in, so its documents stay reachable: a readable part (NUL written as
    ``\\0``, an empty label as ``(empty)``, cut to 200 characters) followed by ``~`` and 12 hex
    digits of the old label's SHA-256, which keeps two old labels from meeting in one name.
    """
    try:
        validate_namespace((label,))
        return label
    except InvalidRecordError:
        pass
    readable = label.replace("\x00", "\\0").encode("utf-8", "replace").decode("utf-8")
    readable = readable[:200] or "(empty)"
    digest = hashlib.sha256(label.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{readable}~{digest}"


def parse_namespace(text: str) -> tuple[str, ...]:
    """A namespace written as text (on a command line): a JSON array of labels
    (``["users", "u/1"]``, for labels holding ``/``, newlines or a leading ``[``) or labels joined
    by ``/`` (``acme/bot``)."""
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
    """A namespace as one line of text, whatever its labels hold: a JSON array of them
    (``parse_namespace`` reads it back)."""
    return json.dumps(list(namespace), ensure_ascii=False)
