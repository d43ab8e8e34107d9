"""JSON-schema-constrained decoding: at each step only tokens that keep the answer a valid
prefix of some JSON value matching the schema may be sampled, so a forced tool call or a
structured output always parses, even from a 135M model.

Built on llguidance, chosen by measurement (``benchmarks/constrained_decoding.py``): xgrammar
masks faster (tens of milliseconds for a whole call, where llguidance spends 0.1-0.2 s on each
of the first steps that reach a new lexer state, then about 0.2 ms a step), but it pulls triton
(1 GB) into a CPU install; lm-format-enforcer does not import under transformers 5. llguidance
has no dependencies. Its view of the tokenizer is built once per tokenizer (about a second); a
schema compiles in milliseconds.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from icmem.errors import IcmemError


class ConstraintError(IcmemError):
    """A schema that cannot constrain decoding, or xgrammar missing; the message says the fix."""


# One space after ":" and ",", as json.dumps writes and models read most: fixed separators
# leave no room for endless whitespace.
_JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
_TOKENIZERS: weakref.WeakKeyDictionary[Any, dict[tuple, Any]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
    except ImportError as error:  # pragma: no cover - llguidance is a dependency
        raise ConstraintError(
            "constrained decoding (tool_choice, with_structured_output) needs llguidance: "
            "pip install llguidance"
        ) from error
    return llguidance


def _grammar_tokenizer(tokenizer: Any, vocab_size: int, stop_ids: tuple[int, ...]) -> Any:
    """llguidance's view of the tokenizer, built once per (tokenizer, vocabulary, stops)."""
    llguidance = _llguidance()
    key = (vocab_size, stop_ids)
    with _LOCK:
        per_tokenizer = _TOKENIZERS.setdefault(tokenizer, {})
        if key not in per_tokenizer:
            per_tokenizer[key] = llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=vocab_size, eos_token=list(stop_ids) or None
            )
        return per_tokenizer[key]


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set logits whose bit is 0 in a packed int32 ``bitmask`` (bit i of word w: token 32w + i)
    to -inf, in place. Plain tensor ops: no kernel to compile on first use."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.reshape(-1, 1) >> shifts) & 1).bool().reshape(-1)[: logits.numel()]
    return logits.masked_fill_(~allowed.view_as(logits), float("-inf"))


def closed_objects(schema: Any) -> Any:
    """The schema with every object that does not say otherwise closed to extra keys: a
    decoder told "any other key is fine" invents keys until it runs out of tokens."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    closed = {key: closed_objects(value) for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


class JsonConstraint:
    """Masks logits so that the decoded text is one JSON value matching ``schema``, then a stop
    token. Stateful: one per answer."""

    def __init__(
        self,
        schema: Mapping[str, Any],
        tokenizer: Any,
        vocab_size: int,
        stop_ids: Iterable[int],
    ) -> None:
        llguidance = _llguidance()
        schema = closed_objects(schema)
        if "x-guidance" not in schema:
            schema = {**schema, "x-guidance": _JSON_STYLE}
        try:
            text = json.dumps(schema)
        except TypeError as error:
            raise ConstraintError(f"the output schema is not JSON: {error}") from error
        stops = tuple(sorted(stop_ids))
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text)
        self._matcher = llguidance.LLMatcher(
            _grammar_tokenizer(tokenizer, vocab_size, stops), grammar
        )
        if self._matcher.is_error():
            raise ConstraintError(
                f"cannot constrain decoding to this JSON schema ({self._matcher.get_error()}); "
                "simplify the schema (objects, strings, numbers, enums and arrays work)"
            )
        self._words = (vocab_size + 31) // 32
        self._stops = stops

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of every token that would break the schema to -inf (in place)."""
        packed = self._matcher.compute_bitmask()
        bitmask = torch.frombuffer(bytearray(packed), dtype=torch.int32)[: self._words]
        return apply_bitmask_(logits, bitmask)

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise ConstraintError(
                f"token {token} does not fit the schema ({self._matcher.get_error()}); mask "
                "the logits first"
            )

    @property
    def finished(self) -> bool:
        """Whether the value is complete (only a stop token may follow)."""
        return bool(self._matcher.is_stopped() or self._matcher.is_accepting())
