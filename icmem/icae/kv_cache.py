"""The stock key/value cache without a copy per token.

transformers' ``DynamicLayer`` appends a token's keys with ``torch.cat``, which copies the
whole cache on every decode step: reading and writing every key and value the sequence holds
again, on top of attention's own read. On a CPU, whose memory bandwidth paces a small model's
decode step, a SmolLM2-135M step after 4,096 tokens took 108 ms with that copy and 86 ms
without it (``benchmarks/results/decode_step_options.json``). A :class:`GrowingLayer` writes
new keys into a buffer that doubles when full and hands attention a view of its filled part:
the same values in the same order, so attention's output is bit for bit the stock cache's.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_CAPACITY = 256  # positions a layer's first buffer holds at least


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are views of a buffer with spare room.

    Anything that replaces ``keys`` or ``values`` (transformers' batch selection, beam
    reordering, a deep copy) leaves them outside the buffer; the next update then copies them
    into a fresh buffer once. ``crop`` keeps a view of the buffer's start, so it stays in place.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.get_seq_length()
        end = held + key_states.shape[-2]
        if not self._in_buffer(end):
            self._rebuffer(key_states, value_states, held, end)
        assert self.key_buffer is not None and self.value_buffer is not None
        self.key_buffer[..., held:end, :] = key_states
        self.value_buffer[..., held:end, :] = value_states
        self.keys = self.key_buffer[..., :end, :]
        self.values = self.value_buffer[..., :end, :]
        return self.keys, self.values

    def _in_buffer(self, end: int) -> bool:
        """Whether ``keys``/``values`` are still views of the start of a buffer with room up to
        position ``end``."""
        keys, values = self._held()
        buffer, value_buffer = self.key_buffer, self.value_buffer
        if buffer is None or value_buffer is None or buffer.shape[-2] < end:
            return False
        if keys.numel() == 0:
            return keys.shape[:-2] == buffer.shape[:-2]
        return (
            keys.data_ptr() == buffer.data_ptr()
            and keys.stride() == buffer.stride()
            and values.data_ptr() == value_buffer.data_ptr()
            and values.stride() == value_buffer.stride()
        )

    def _rebuffer(
        self, key_states: torch.Tensor, value_states: torch.Tensor, held: int, end: int
    ) -> None:
        previous = 0 if self.key_buffer is None else self.key_buffer.shape[-2]
        capacity = max(end, 2 * previous, MIN_CAPACITY)
        keys = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        values = value_states.new_empty(
            (*value_states.shape[:-2], capacity, value_states.shape[-1])
        )
        if held:
            keys[..., :held, :], values[..., :held, :] = self._held()
        self.key_buffer, self.value_buffer = keys, values

    def _held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values held (only read once the layer is initialized)."""
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        super().reset()


def growing_cache(config: Any) -> DynamicCache:
    """A ``DynamicCache`` for ``config``'s model whose full-attention layers grow in place
    (sliding-window layers, where a model has them, stay transformers' own). Without a config
    every layer, made as the model first calls it, grows in place."""
    cache = DynamicCache(config=config)
    if cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = GrowingLayer
    cache.layers = [
        GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache
