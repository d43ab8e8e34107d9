"""Decoding a plain causal LM from token ids, a batch in lockstep, through the one sampling loop.

The teacher's answers in distillation, the distillation triples of the training data and the
passkey evaluation decode a plain (adapter-free) model from token ids, often many prompts at
once: on a CPU one decode step costs little more for eight rows than for one. Each row gets
its own :func:`~icmem.icae.decoder.sample_tokens` loop, so a token is still chosen in one place;
this module only runs their forward passes together, one batched forward per step.

The model is called exactly as Hugging Face ``generate`` calls it (positions from the attention
mask, the mask dropped when it has no padding, ``logits_to_keep=1``, finished rows fed the pad
token so the batch keeps its shape, prefill in chunks when asked), so greedy answers and their
logits are the ones ``generate`` gave, to the bit (``tests/icae/test_batch_decode.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from icmem.icae.decoder import GREEDY, FinishReason, Sampling, sample_tokens


@dataclass
class Decoded:
    """One row's answer: its token ids (the stop token excluded), why it ended, the stop
    token if one ended it, and, when asked for, the float32 logits each token was chosen from
    (the stop token's included)."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_token: int | None = None
    logits: list[torch.Tensor] = field(default_factory=list)

    def generated(self) -> list[int]:
        """The token ids as ``generate`` returned them: the stop token kept."""
        return self.token_ids + ([] if self.stop_token is None else [self.stop_token])


def decode_batch(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: frozenset[int],
    pad_id: int,
    attention_mask: torch.Tensor | None = None,
    sampling: Sampling = GREEDY,
    cache: Any = None,
    prefill_chunk: int | None = None,
    keep_logits: bool = False,
) -> list[Decoded]:
    """Answers to the rows of ``input_ids`` ``(B, L)``, left-padded where ``attention_mask``
    has zeros. ``cache`` (a fresh one; by default the stock cache, growing in place,
    ``icmem.icae.kv_cache``) holds the keys, e.g. an LM-Infinite cache; ``prefill_chunk`` reads
    the prompt that many tokens at a time."""
    from icmem.icae.kv_cache import growing_cache

    if cache is None:
        cache = growing_cache(getattr(model, "config", None))
    batch = _Lockstep(model, input_ids, attention_mask, cache, pad_id)
    first = batch.prefill(prefill_chunk)
    rows = [Decoded() for _ in range(input_ids.shape[0])]
    streams = [
        sample_tokens(
            _kept(decoded, first[row], keep_logits),
            _row_step(batch, row, decoded, keep_logits),
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_ids=stop_ids,
        )
        for row, decoded in enumerate(rows)
    ]
    active = list(range(len(rows)))
    while active:
        batch.round += 1
        for row in list(active):
            token = next(streams[row], None)
            if token is None:
                rows[row].finish_reason = streams[row].finish_reason
                rows[row].stop_token = streams[row].stop_token
                batch.last[row] = pad_id
                active.remove(row)
            else:
                rows[row].token_ids.append(token)
                batch.last[row] = token
    return rows


class _Lockstep:
    """The batch's cache, mask and positions, and its forward passes: the first row of a
    round to ask for logits runs the step for every row, the others read their row of it."""

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Any,
        pad_id: int,
    ) -> None:
        self.model, self.input_ids, self.cache = model, input_ids, cache
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = attention_mask.long().cumsum(-1) - 1
        self.positions = positions.masked_fill(attention_mask == 0, 0)
        # As generate: a mask without padding is dropped (the model's causal mask serves).
        self.mask = None if bool((attention_mask == 1).all()) else attention_mask
        self.last = [pad_id] * input_ids.shape[0]  # each row's latest token (pad once done)
        self.round = 0
        self._stepped = 0  # the round whose step has run
        self._logits: torch.Tensor | None = None

    def prefill(self, chunk: int | None) -> torch.Tensor:
        """The prompt's last logits ``(B, V)`` in float32, read whole or ``chunk`` at a time."""
        length = self.input_ids.shape[1]
        size = length if chunk is None else chunk
        out: Any = None
        for start in range(0, length, size):
            end = min(start + size, length)
            out = self._forward(
                self.input_ids[:, start:end],
                self.positions[:, start:end],
                None if self.mask is None else self.mask[:, :end],
            )
        assert out is not None  # a prompt has at least one token
        return out

    def step(self) -> torch.Tensor:
        """Every row's next logits ``(B, V)`` after this round's tokens (in ``last``), run
        once per round."""
        if self._stepped != self.round:
            self._stepped = self.round
            ids = torch.tensor([self.last], device=self.input_ids.device).T  # (B, 1)
            self.positions = self.positions[:, -1:] + 1
            if self.mask is not None:
                self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], 1)
            self._logits = self._forward(ids, self.positions, self.mask)
        assert self._logits is not None
        return self._logits

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        out = self.model(
            input_ids=ids.contiguous(),
            position_ids=positions.contiguous(),
            attention_mask=mask,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.cache
        return out.logits[:, -1].to(copy=True, dtype=torch.float32)


def _row_step(
    batch: _Lockstep, row: int, decoded: Decoded, keep: bool
) -> Callable[[int], torch.Tensor]:
    """``row``'s step for its sampling loop: its row of the batch's step (the token it passes
    is already in ``batch.last``)."""

    def step(_token: int) -> torch.Tensor:
        return _kept(decoded, batch.step()[row], keep)

    return step


def _kept(decoded: Decoded, logits: torch.Tensor, keep: bool) -> torch.Tensor:
    if keep:
        decoded.logits.append(logits)
    return logits


def stop_token_ids(model: nn.Module) -> frozenset[int]:
    """The ids that end an answer by the model's generation config: where ``generate``
    stopped when no ``eos_token_id`` was passed to it."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        return frozenset()
    return frozenset([configured] if isinstance(configured, int) else map(int, configured))


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows as one left-padded ``(B, L)`` batch and its attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask
