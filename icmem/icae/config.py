"""Configuration of an In-Context Autoencoder.

The config is everything needed to rebuild an untrained ICAE on top of a base model; a
checkpoint stores it beside the trained tensors, so it must round-trip through JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from icmem.chunking import DEFAULT_SPAN_TOKENS
from icmem.icae.errors import ICAEConfigError
from icmem.models import DEFAULT_MODEL

DTYPES = ("float32", "bfloat16", "auto")  # auto: icmem.hardware.fast_dtype()
SHORT_SPAN_POLICIES = ("proportional", "fixed")
SLOT_POSITIONS = ("sequential", "spread")
SLOT_HEADS = ("none", "scale", "affine")
SLOT_RESIDUALS = ("none", "pooled")


@dataclass(frozen=True)
class ICAEConfig:
    """How an ICAE is built: base model, memory size, LoRA adapter and special tokens.

    Short spans: with ``short_span_policy="proportional"`` a span of ``n`` tokens gets
    ``min(k, max(min_memory_tokens, ceil(n / ratio)))`` slots, where
    ``ratio = span_tokens / num_memory_tokens`` (4 with the defaults). A 40-token tail then
    costs 10 slots instead of the 128 that the original ICAE spends on it, which would expand
    rather than compress it. The slots of a short span are the hidden states at the *first*
    ``k'`` memory tokens; because attention is causal, they are exactly what the full-length
    encoder would produce at those positions, so one set of memory embeddings serves every
    length. ``"fixed"`` always spends ``k`` slots, as the paper does.

    Recipe options (the defaults reproduce the first shipped checkpoint):

    - ``slot_positions="spread"`` ("Position IDs Matter", arXiv 2409.14364) gives span tokens
      positions ``1..L`` and memory token ``j`` the position at the centre of the ``L/k'``
      tokens it stands for; the decoder keeps those positions for the slots, so under RoPE each
      slot sits beside the text it must reproduce. ``"sequential"`` numbers everything in
      reading order, as the original ICAE does.
    - ``slot_layer`` reads slots from the residual stream after that many decoder layers
      instead of the final normed output (the encoder then stops there, which also saves
      compute); ``None`` is the last layer.
    - ``slot_head`` maps encoder states to decoder inputs: ``"none"`` passes them through,
      ``"scale"`` RMS-normalises each slot and multiplies by a learned per-dimension gain that
      starts at the token embeddings' RMS (the final norm otherwise delivers slots at about 16x
      token scale), ``"affine"`` adds a learned linear map that starts as the identity.
    - ``slot_residual="pooled"`` adds to slot ``j`` the mean embedding of the ``L/k'`` tokens it
      stands for (the head's gain then starts at a quarter of token scale). The frozen decoder
      reads such a bag of nearby tokens from the first step, so the encoder starts from a
      memory that already carries the span's words and learns what the mean loses (their
      order and what they mean together) instead of discovering a code from nothing.
    - ``decoder_lora_rank > 0`` gives the decoder a LoRA adapter of its own (same targets,
      alpha twice the rank), active only while it reads memory; without memory the base model
      answers exactly as before. 0 keeps the paper's frozen decoder.
    """

    base_model: str = DEFAULT_MODEL
    base_revision: str | None = None
    num_memory_tokens: int = 128
    span_tokens: int = DEFAULT_SPAN_TOKENS
    lora_rank: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    special_tokens: tuple[str, ...] = ("ae", "lm", "ft")
    dtype: str = "float32"
    short_span_policy: str = "proportional"
    min_memory_tokens: int = 8
    slot_positions: str = "sequential"
    slot_layer: int | None = None
    slot_head: str = "none"
    slot_residual: str = "none"
    decoder_lora_rank: int = 0

    def __post_init__(self) -> None:
        # JSON has no tuples; accept lists and store tuples so configs compare equal.
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))
        if not self.base_model:
            raise ICAEConfigError("base_model is empty; name a model icmem.load_model accepts")
        for name in ("num_memory_tokens", "span_tokens", "lora_rank", "min_memory_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ICAEConfigError(f"{name}={value!r}; it must be a positive integer")
        if self.num_memory_tokens > self.span_tokens:
            raise ICAEConfigError(
                f"num_memory_tokens={self.num_memory_tokens} exceeds span_tokens="
                f"{self.span_tokens}: slots would expand the text; lower k or raise the span"
            )
        if self.min_memory_tokens > self.num_memory_tokens:
            raise ICAEConfigError(
                f"min_memory_tokens={self.min_memory_tokens} exceeds num_memory_tokens="
                f"{self.num_memory_tokens}; the floor must be at most k"
            )
        if self.lora_alpha <= 0:
            raise ICAEConfigError(f"lora_alpha={self.lora_alpha}; it must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ICAEConfigError(f"lora_dropout={self.lora_dropout}; use a value in [0, 1)")
        if not self.lora_targets:
            raise ICAEConfigError("lora_targets is empty; name modules such as 'q_proj'")
        required = {"ae", "lm", "ft"}
        if not required <= set(self.special_tokens):
            raise ICAEConfigError(
                f"special_tokens={self.special_tokens} lacks {sorted(required)}; "
                "the autoencoding, continuation and instruction tasks each need one"
            )
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ICAEConfigError(f"special_tokens={self.special_tokens} has duplicates")
        if self.dtype not in DTYPES:
            raise ICAEConfigError(f"dtype={self.dtype!r}; use one of {DTYPES}")
        if self.short_span_policy not in SHORT_SPAN_POLICIES:
            raise ICAEConfigError(
                f"short_span_policy={self.short_span_policy!r}; use one of {SHORT_SPAN_POLICIES}"
            )

        if self.slot_positions not in SLOT_POSITIONS:
            raise ICAEConfigError(
                f"slot_positions={self.slot_positions!r}; use one of {SLOT_POSITIONS}"
            )
        if self.slot_head not in SLOT_HEADS:
            raise ICAEConfigError(f"slot_head={self.slot_head!r}; use one of {SLOT_HEADS}")
        if (
            not isinstance(self.decoder_lora_rank, int)
            or isinstance(self.decoder_lora_rank, bool)
            or self.decoder_lora_rank < 0
        ):
            raise ICAEConfigError(
                f"decoder_lora_rank={self.decoder_lora_rank!r}; use 0 (frozen decoder) or a "
                "positive rank"
            )
        if self.slot_residual not in SLOT_RESIDUALS:
            raise ICAEConfigError(
                f"slot_residual={self.slot_residual!r}; use one of {SLOT_RESIDUALS}"
            )
        if self.slot_residual == "pooled" and self.slot_head == "none":
            raise ICAEConfigError(
                'slot_residual="pooled" adds token embeddings to the slots, so the slots must be '
                'at token scale too: set slot_head to "scale" or "affine"'
            )
        if self.slot_layer is not None and (
            not isinstance(self.slot_layer, int)
            or isinstance(self.slot_layer, bool)
            or self.slot_layer < 1
        ):
            raise ICAEConfigError(
                f"slot_layer={self.slot_layer!r}; use a layer count of at least 1, or None for "
                "the last layer"
            )

    @property
    def compression_ratio(self) -> float:
        """Tokens per slot for a full span."""
        return self.span_tokens / self.num_memory_tokens

    def slots_for(self, token_count: int) -> int:
        """How many memory slots a span of ``token_count`` tokens gets (see the class doc)."""
        if token_count < 1:
            raise ICAEConfigError(f"a span needs at least one token, got {token_count}")
        if token_count > self.span_tokens:
            raise ICAEConfigError(
                f"a span of {token_count} tokens is longer than span_tokens={self.span_tokens}; "
                "split the text into spans first"
            )
        if self.short_span_policy == "fixed":
            return self.num_memory_tokens
        proportional = math.ceil(token_count / self.compression_ratio)
        return min(self.num_memory_tokens, max(self.min_memory_tokens, proportional))

    def slot_positions_for(self, token_count: int, num_slots: int) -> list[int]:
        """Positions of a span's slots relative to the position before its first token.

        ``sequential``: ``L + j`` (0-based span tokens, memory after them). ``spread``: the
        centre of the ``L / num_slots`` tokens slot ``j`` stands for, counting span tokens
        from 1 (``2, 6, 10, ...`` at 4x).
        """
        if self.slot_positions == "sequential":
            return [token_count + j for j in range(num_slots)]
        ratio = token_count / num_slots
        return [1 + max(0, math.floor(ratio * j + (ratio - 1) / 2)) for j in range(num_slots)]

    def slot_groups(self, token_count: int, num_slots: int) -> list[tuple[int, int]]:
        """``(first, end)`` 0-based token ranges slot ``j`` stands for: consecutive groups of
        about ``L / num_slots`` tokens (one token at least, when slots outnumber tokens)."""
        ratio = token_count / num_slots
        groups = []
        for j in range(num_slots):
            first = min(math.floor(ratio * j), token_count - 1)
            groups.append((first, max(first + 1, math.floor(ratio * (j + 1)))))
        return groups

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora_targets"] = list(self.lora_targets)
        data["special_tokens"] = list(self.special_tokens)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ICAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ICAEConfigError(
                f"unknown ICAE config keys {unknown}; this icmem understands {sorted(known)}"
            )
        return cls(**data)
