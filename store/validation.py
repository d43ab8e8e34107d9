"""One validation of everything a caller hands the store, the same for SQLite and Postgres.

The two databases disagree on what they accept: Postgres refuses NUL characters, strings longer
than their VARCHAR, integers past int32 in INTEGER columns and NaN in JSONB, while SQLite stores
all of them and only fails later, when a JSON function meets ``NaN`` or a comparison meets an
integer it cannot bind. So the store checks every value here, before a transaction opens, against
the stricter of the two, and both backends accept and refuse exactly the same records.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from typing import Any

from .errors import InvalidRecordError

__all__ = [
    "MAX_CONTENT_HASH_CHARS",
    "MAX_CONTENT_ID_CHARS",
    "MAX_KEY_CHARS",
    "MAX_METADATA_DEPTH",
    "MAX_VECTOR_NORM",
    "check_count",
    "check_metadata",
    "check_text",
]

MAX_KEY_CHARS = 255  # document ids and namespace parts: VARCHAR(255) on Postgres
MAX_CONTENT_HASH_CHARS = 128
MAX_CONTENT_ID_CHARS = 64
# Embeddings longer than this overflow float32 inner products (the product of two norms must stay
# below float32's 3.4e38); real embeddings are unit length or close to it.
MAX_VECTOR_NORM = 1e19
MAX_METADATA_DEPTH = 32  # nesting of lists and mappings inside a document's metadata
INT32_MAX = 2**31 - 1  # positions, offsets and token counts are INTEGER columns
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # SQLite's JSON integers; beyond, it rounds to a float

_JSON_TYPES = "str, int, float, bool, None, lists and mappings with string keys"


def check_text(value: Any, what: str, *, max_chars: int | None = None, empty: bool = True) -> str:
    """A string both databases store unchanged: no NUL, valid UTF-8, within the column's size."""
    if not isinstance(value, str):
        raise InvalidRecordError(f"{what} must be a string, got {type(value).__name__}")
    if not empty and not value:
        raise InvalidRecordError(f"{what} must be a non-empty string")
    if max_chars is not None and len(value) > max_chars:
        raise InvalidRecordError(
            f"{what} is {len(value)} characters; it may be at most {max_chars} (use a shorter "
            "key, e.g. a hash of the long one)"
        )
    _check_characters(value, what)
    return value


def _check_characters(value: str, what: str) -> None:
    if "\x00" in value:
        raise InvalidRecordError(
            f"{what} contains a NUL character (\\x00), which Postgres cannot store; remove it "
            "(it is usually a sign of binary data decoded as text)"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRecordError(
            f"{what} is not valid UTF-8 text (a lone surrogate at position {exc.start}); decode "
            "the source with errors='replace' or fix its encoding"
        ) from exc


def check_count(value: Any, what: str) -> int:
    """A non-negative int that fits the INTEGER columns of both databases (numpy ints welcome)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise InvalidRecordError(f"{what} must be an int, got {type(value).__name__}") from None
    if not 0 <= number <= INT32_MAX:
        raise InvalidRecordError(f"{what} must be >= 0 and at most {INT32_MAX}, got {number}")
    return number


def check_metadata(metadata: Any, what: str) -> dict[str, Any]:
    """A plain-JSON copy of a document's metadata, or InvalidRecordError naming the bad value.

    Accepts what both databases store and filter identically: strings without NUL, 64-bit ints,
    finite floats, booleans, None, and lists and string-keyed mappings of those nested at most
    ``MAX_METADATA_DEPTH`` deep. Tuples become lists; numpy's float64 (a float) becomes a float.
    """
    if not isinstance(metadata, Mapping):
        raise InvalidRecordError(
            f"{what} must be a mapping with string keys, got {type(metadata).__name__}"
        )
    return _plain(metadata, what, 0)


def _plain(value: Any, path: str, depth: int) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        _check_characters(value, path)
        return str(value)
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise InvalidRecordError(
                f"{path} is {value}, outside the 64-bit integer range that both databases "
                "compare exactly; store it as a string"
            )
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRecordError(
                f"{path} is {value}: NaN or infinity is not JSON and breaks filtered searches; "
                "store None or a string instead"
            )
        return float(value)
    if isinstance(value, Mapping | list | tuple):
        if depth >= MAX_METADATA_DEPTH:
            raise InvalidRecordError(
                f"{path} is nested more than {MAX_METADATA_DEPTH} levels deep; flatten the "
                "metadata (filters only reach top-level keys anyway)"
            )
        if isinstance(value, Mapping):
            plain = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InvalidRecordError(
                        f"{path} has a key {key!r} of type {type(key).__name__}; metadata keys "
                        "must be strings"
                    )
                _check_characters(key, f"key {key!r} of {path}")
                plain[key] = _plain(item, f"{path}[{key!r}]", depth + 1)
            return plain
        return [_plain(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    hint = ""
    if type(value).__module__ == "numpy":
        hint = " (convert numpy values with .item() or .tolist())"
    raise InvalidRecordError(
        f"{path} is a {type(value).__name__}, which is not JSON{hint}; metadata may hold "
        f"{_JSON_TYPES}"
    )
