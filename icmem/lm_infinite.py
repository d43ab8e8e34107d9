"""LM-Infinite attention (Han et al., arXiv 2308.16137) for Llama-family models on transformers 5.

A model pretrained on sequences of length L breaks down past L for two reasons: queries meet
rotary distances they never saw, and attention spreads over more keys than it was trained on.
LM-Infinite fixes both without training, and this module does it through transformers' own
extension points (an ``AttentionInterface`` function, an ``AttentionMaskInterface`` function and
a ``Cache`` subclass): no modeling file is patched, and the parity tests against stock attention
catch a transformers release that changes those contracts.

Semantics (W = ``local_window``, g = ``global_tokens``, query at position i, key at position j):

* The Λ mask: the query attends to keys with ``0 <= i - j <= W`` (the local window, which
  *includes* a key at distance exactly W: W + 1 keys counting the query itself) and to the first
  g tokens of the sequence (``j < g``) whatever the distance.
* The distance cap: the pair is rotated by ``min(i - j, W)``. Inside the window that is the true
  distance, so for sequences of at most W + 1 tokens the result equals stock attention; a global
  token further than W away is seen at distance exactly W.
* ``local_window`` defaults to ``max_position_embeddings``, the pretraining length.

Where rotation happens. Llama-family attention rotates queries and keys before calling the
attention function and before storing keys in the cache, so the cache would hold keys rotated by
their absolute position, which can grow without bound. Here:

1. :class:`LMInfiniteCache` undoes that rotation as keys arrive (exactly: it applies the inverse
   of the very cos/sin the model used), so it stores *unrotated* keys, and it keeps only the g
   global and the W most recent keys of each layer: at most ``g + W`` entries, forever.
2. The attention function undoes the rotation of the queries the same way, then re-rotates
   queries and window keys by positions relative to ``base``, the earliest position any query
   of the call can see in its window (so no angle exceeds ``W + n`` for a call of n tokens,
   however long the conversation), and rotates the global keys at 0 against queries rotated at
   W for the capped pairs. Both parts share one softmax, computed ``query_block`` queries at a
   time.
3. The cache tells the attention function which positions the keys it just returned hold (a
   hand-off keyed by the attention module). Without that hand-off (no cache, or a stock
   ``DynamicCache``) the keys are taken as rotated and contiguous up to the newest token, and
   only the ones the Λ mask needs are unrotated: results are the same, but memory is unbounded.
   Pass ``past_key_values=make_cache(model)`` to get the bounded cache.

Costs: a prefill of n tokens takes O(n·W) time; memory is O(n) (the model's own activations) plus
O(query_block·W) for the scores. Each generated token costs O(W) time and O(1) extra memory.

Not supported: padded batches (they raise :class:`LMInfiniteError`; batch equal-length prompts or
run one sequence per call), RoPE types whose frequencies change with length ("dynamic",
"longrope"), and the paper's optional top-k middle tokens (``top_k_middle`` must stay 0: it needs
every middle key kept, which a bounded cache cannot do).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface

from icmem.errors import IcmemError

ATTN_IMPLEMENTATION = "lm_infinite"
_UNSUPPORTED_ROPE_TYPES = ("dynamic", "longrope")

__all__ = [
    "ATTN_IMPLEMENTATION",
    "LMInfiniteCache",
    "LMInfiniteConfig",
    "LMInfiniteError",
    "LMInfiniteLayer",
    "disable",
    "enable",
    "enabled",
    "is_enabled",
    "make_cache",
]


class LMInfiniteError(IcmemError):
    """A model, input or cache that LM-Infinite attention cannot serve; the message says the fix."""


@dataclass(frozen=True)
class LMInfiniteConfig:
    """How far each query sees: g global tokens, a local window of W, distances capped at W.

    ``query_block`` only trades memory for speed (scores are built for that many queries at a
    time); it never changes the result.
    """

    local_window: int
    global_tokens: int = 10
    top_k_middle: int = 0
    query_block: int = 512

    def __post_init__(self) -> None:
        if self.local_window < 1:
            raise LMInfiniteError(
                f"local_window must be >= 1, got {self.local_window}; pass the pretraining length "
                "or leave it None to read max_position_embeddings from the model config"
            )
        if self.global_tokens < 0:
            raise LMInfiniteError(f"global_tokens must be >= 0, got {self.global_tokens}")
        if self.top_k_middle != 0:
            raise LMInfiniteError(
                f"top_k_middle={self.top_k_middle} is not supported: attending to top-k middle "
                "tokens needs every middle key kept, which the bounded cache drops; use 0"
            )
        if self.query_block < 1:
            raise LMInfiniteError(f"query_block must be >= 1, got {self.query_block}")

    @property
    def cache_capacity(self) -> int:
        """Most keys any layer of :class:`LMInfiniteCache` keeps between forward passes."""
        return self.global_tokens + self.local_window


@dataclass
class _Binding:
    config: LMInfiniteConfig
    rotary: nn.Module
    # float32 cos/sin of relative positions 0..len-1, shared by all layers, grown on demand.
    table: tuple[torch.Tensor, torch.Tensor] | None = None

    def relative_cos_sin(
        self, start: int, length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (1, 1, length, D) of positions start..start+length-1, sliced from a table."""
        needed = start + length
        if self.table is None or self.table[0].shape[-2] < needed or self.table[0].device != device:
            size = max(needed, self.config.local_window + self.config.query_block + 1)
            self.table = _cos_sin(self.rotary, torch.arange(size, device=device), torch.float32)
        cos, sin = self.table
        return cos[..., start:needed, :], sin[..., start:needed, :]


# Attention module -> its LM-Infinite settings; set by enable(), cleared by disable().
_BINDINGS: weakref.WeakKeyDictionary[nn.Module, _Binding] = weakref.WeakKeyDictionary()
# Attention module -> positions of the unrotated keys LMInfiniteCache.update just returned to it.
_HANDOFF: weakref.WeakKeyDictionary[nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()
# Model -> the attention implementation to restore on disable().
_PREVIOUS_IMPLEMENTATION: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------
# Rotary helpers
# ---------------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cos_sin(
    rotary: nn.Module, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (1, 1, n, D) computed by the model's own rotary module, as float32.

    ``dtype`` is the dtype the model computed them in, so that inverting a rotation uses the very
    numbers the forward pass used.
    """
    like = torch.empty(0, dtype=dtype, device=positions.device)
    cos, sin = rotary(like, positions.reshape(1, -1))
    return cos.float()[:, None], sin.float()[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, written once into a fresh tensor (no temporaries: on long
    windows this runs over every cached key at every step)."""
    if x.requires_grad and torch.is_grad_enabled():  # out= cannot be differentiated
        return x * cos + _rotate_half(x) * sin
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., :half], sin[..., :half]  # both halves of cos/sin are equal in RoPE
    out = torch.empty(torch.broadcast_shapes(x.shape, cos.shape), dtype=x.dtype, device=x.device)
    torch.mul(x1, c, out=out[..., :half]).addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=out[..., half:]).addcmul_(x1, s)
    return out


def _unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of _rotate for the same cos/sin (exact up to rounding, whatever the angle)."""
    x32 = x.float()
    return ((x32 * cos - _rotate_half(x32) * sin) / (cos * cos + sin * sin)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The Λ-shaped attention with capped distances
# ---------------------------------------------------------------------------------------------


def _layout(key_positions: torch.Tensor, global_tokens: int) -> tuple[int, int, int]:
    """Where the global keys start, how many there are, and where the window keys end.

    Keys come in one of two layouts (see LMInfiniteLayer): the whole history in order, or a
    window in order followed by the global tokens. Either way the globals are one run of
    indices and the window is another, in position order, ending with the newest keys.
    """
    total = key_positions.shape[0]
    n_global = int((key_positions < global_tokens).sum())
    if n_global == total or int(key_positions[0]) < global_tokens:
        return 0, n_global, total
    return total - n_global, n_global, total - n_global


def _lambda_attention(
    query: torch.Tensor,  # (B, H, n, D), unrotated
    key: torch.Tensor,  # (B, Hkv, T, D), unrotated
    value: torch.Tensor,  # (B, Hkv, T, D)
    query_positions: torch.Tensor,  # (n,) increasing by one
    key_positions: torch.Tensor,  # (T,) increasing
    binding: _Binding,
    scaling: float,
) -> torch.Tensor:
    """Returns (B, n, H, D).

    Rotations are relative to ``base``, the earliest position any query of this call can see
    in its window, so angles stay below ``W + n`` however long the sequence has run. Keys older
    than ``base`` only ever appear as global tokens, rotated at 0 against queries rotated at W.
    """
    config = binding.config
    batch, heads, n, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    window = config.local_window

    global_start, n_global, window_end = _layout(key_positions, config.global_tokens)
    base = max(int(query_positions[0]) - window, 0)
    first_local = int(torch.searchsorted(key_positions[:window_end], base))
    local_positions = key_positions[first_local:window_end]  # contiguous: base, base + 1, ...
    device = query.device
    k = _rotate(
        key[:, :, first_local:window_end].float(),
        *binding.relative_cos_sin(int(local_positions[0]) - base, len(local_positions), device),
    )
    q = _rotate(
        query.float() * scaling,
        *binding.relative_cos_sin(int(query_positions[0]) - base, n, device),
    )
    v = value[:, :, first_local:window_end].float()

    needs_global = n_global > 0 and int(query_positions[-1]) - window > 0
    if needs_global:
        global_end = global_start + n_global
        global_positions = key_positions[global_start:global_end]
        global_k = _rotate(
            key[:, :, global_start:global_end].float(), *binding.relative_cos_sin(0, 1, device)
        )
        capped_q = _rotate(query.float() * scaling, *binding.relative_cos_sin(window, 1, device))
        global_v = value[:, :, global_start:global_end].float()

    def grouped(x: torch.Tensor) -> torch.Tensor:  # (B, H, m, D) -> (B, Hkv, G·m, D)
        return x.reshape(batch, kv_heads, groups * x.shape[-2], dim)

    out = torch.empty(batch, heads, n, dim, dtype=value.dtype, device=value.device)
    for start in range(0, n, config.query_block):
        stop = min(n, start + config.query_block)
        rows = groups * (stop - start)
        q_pos = query_positions[start:stop]
        lo = int(torch.searchsorted(local_positions, q_pos[0] - window))
        hi = int(torch.searchsorted(local_positions, q_pos[-1], right=True))
        shape = (batch, kv_heads, groups, stop - start, -1)
        # One softmax over both parts, without concatenating them: shared max, shared sum.
        scores = (grouped(q[:, :, start:stop]) @ k[:, :, lo:hi].transpose(-1, -2)).view(shape)
        distance = q_pos[:, None] - local_positions[None, lo:hi]
        scores.masked_fill_((distance < 0) | (distance > window), float("-inf"))
        peak = scores.amax(dim=-1, keepdim=True)
        if needs_global:
            capped = (grouped(capped_q[:, :, start:stop]) @ global_k.transpose(-1, -2)).view(shape)
            beyond = (q_pos[:, None] - global_positions[None, :]) > window
            capped.masked_fill_(~beyond, float("-inf"))
            peak = torch.maximum(peak, capped.amax(dim=-1, keepdim=True))
        weights = scores.sub_(peak).exp_()
        total = weights.sum(dim=-1, keepdim=True)
        block = weights.view(batch, kv_heads, rows, -1) @ v[:, :, lo:hi]
        if needs_global:
            capped_weights = capped.sub_(peak).exp_()
            total += capped_weights.sum(dim=-1, keepdim=True)
            block += capped_weights.view(batch, kv_heads, rows, -1) @ global_v
        block = block.view((*shape[:-1], dim)) / total
        out[:, :, start:stop] = block.view(batch, heads, stop - start, dim).to(out.dtype)
    return out.transpose(1, 2)


def _lm_infinite_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function registered in transformers' AttentionInterface as ``"lm_infinite"``."""
    binding = _BINDINGS.get(module)
    if binding is None:
        raise LMInfiniteError(
            f"{type(module).__name__} runs attn_implementation={ATTN_IMPLEMENTATION!r} but "
            "LM-Infinite was not enabled on its model; call icmem.lm_infinite.enable(model)"
        )
    if attention_mask is not None:
        raise LMInfiniteError(
            "LM-Infinite attention got a padded batch (zeros in attention_mask) or a custom 4D "
            "mask; it needs every row to share positions: run one sequence per call or batch "
            "prompts of equal length without padding"
        )
    if dropout and module.training:
        raise LMInfiniteError("LM-Infinite attention is for inference; call model.eval() first")
    if position_ids is None:
        raise LMInfiniteError(
            "LM-Infinite attention needs position_ids from the model forward; this model's "
            "attention does not pass them, so it is not a supported Llama-family model"
        )
    n = query.shape[-2]
    positions = position_ids.reshape(-1, n)
    query_positions = positions[0]
    expected = query_positions[0] + torch.arange(n, device=query_positions.device)
    if not (torch.equal(query_positions, expected) and bool((positions == query_positions).all())):
        raise LMInfiniteError(
            "LM-Infinite attention needs consecutive positions shared by every batch row "
            "(no padding, no packed sequences); pass plain unpadded inputs"
        )
    config, rotary = binding.config, binding.rotary

    key_positions = _HANDOFF.pop(module, None)
    if key_positions is None:  # keys straight from the model (no cache or a stock cache): rotated
        total = key.shape[-2]
        key_positions = torch.arange(total, device=key.device) + (query_positions[-1] + 1 - total)
        if config.global_tokens and int(key_positions[0]) > 0:
            raise LMInfiniteError(
                "the cache passed to the model has dropped the first tokens that LM-Infinite "
                "keeps as global tokens (a sliding-window cache?); pass "
                "past_key_values=icmem.lm_infinite.make_cache(model)"
            )
        needed = (key_positions < config.global_tokens) | (
            key_positions >= query_positions[0] - config.local_window
        )
        key, value, key_positions = key[:, :, needed], value[:, :, needed], key_positions[needed]
        key = _unrotate(key, *_cos_sin(rotary, key_positions, key.dtype))
    else:
        window_end = _layout(key_positions, config.global_tokens)[2]
        cached = key_positions[window_end - n : window_end]
        if not torch.equal(cached, query_positions):
            raise LMInfiniteError(
                f"position_ids start at {int(query_positions[0])} but the LM-Infinite cache "
                f"placed these tokens at {int(cached[0])}; do not pass explicit position_ids "
                "that skip or repeat positions with this cache"
            )

    query = _unrotate(query, *_cos_sin(rotary, query_positions, query.dtype))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    output = _lambda_attention(query, key, value, query_positions, key_positions, binding, scale)
    return output.contiguous(), None


def _padding_mask_only(attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """Mask function for ``"lm_infinite"``: the Λ mask is built inside the attention function,
    so no O(n·T) mask is materialised; a padding mask is passed on only so that it can raise."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask


AttentionInterface.register(ATTN_IMPLEMENTATION, _lm_infinite_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask_only)


# ---------------------------------------------------------------------------------------------
# The bounded cache
# ---------------------------------------------------------------------------------------------


class LMInfiniteLayer(DynamicLayer):
    """One layer's unrotated keys and values: the first g tokens and the W most recent ones.

    ``get_seq_length`` counts every token seen (as transformers expects, to place new tokens);
    ``keys.shape[-2]`` is what is actually held, at most ``g + W``.
    """

    is_croppable = False

    def __init__(self, global_tokens: int, local_window: int) -> None:
        super().__init__()
        self.global_tokens = global_tokens
        self.local_window = local_window
        self.seen_tokens = 0
        self.positions: torch.Tensor | None = None
        self.trailing_globals = 0  # > 0 once the layer holds [window | globals]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states[..., :0, :].clone()  # (B, Hkv, 0, D): sliceable like the rest
        self.values = value_states[..., :0, :].clone()
        self.positions = torch.empty(0, dtype=torch.long, device=key_states.device)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append unrotated keys; return everything the current queries need; keep g + W.

        Until the first key is dropped the layer holds the history in order. From then on it
        holds ``[window | globals]``: the new keys go between the two in the one copy each step
        makes, and dropping the oldest window keys is a view, not a second copy.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        new_positions = torch.arange(n, device=self.positions.device) + self.seen_tokens
        split = self.keys.shape[-2] - self.trailing_globals  # where the new keys go
        keys = torch.cat((self.keys[..., :split, :], key_states, self.keys[..., split:, :]), -2)
        values = torch.cat(
            (self.values[..., :split, :], value_states, self.values[..., split:, :]), -2
        )
        positions = torch.cat((self.positions[:split], new_positions, self.positions[split:]))
        self.seen_tokens += n
        self.returned_positions = positions

        oldest_needed = self.seen_tokens - self.local_window
        total = positions.shape[0]
        if self.trailing_globals or not self.global_tokens:
            drop = int((positions[: total - self.trailing_globals] < oldest_needed).sum())
            kept = (keys[..., drop:, :], values[..., drop:, :], positions[drop:])
        else:
            n_global = int((positions < self.global_tokens).sum())
            n_recent = int((positions >= oldest_needed).sum())
            if n_global + n_recent >= total:
                kept = (keys, values, positions)
            else:  # the first drop: move to [window | globals], once
                recent = total - n_recent
                kept = (
                    torch.cat((keys[..., recent:, :], keys[..., :n_global, :]), -2),
                    torch.cat((values[..., recent:, :], values[..., :n_global, :]), -2),
                    torch.cat((positions[recent:], positions[:n_global])),
                )
                self.trailing_globals = n_global
        if kept[0].shape[-2] * 2 < keys.shape[-2]:  # do not pin a long prefill's keys in memory
            kept = tuple(t.clone() for t in kept)
        self.keys, self.values, self.positions = kept
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return self.global_tokens + self.local_window

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.positions = None
        self.trailing_globals = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise LMInfiniteError(
            "LMInfiniteCache cannot be cropped (dropped keys are gone); assisted or speculative "
            "decoding is not supported with LM-Infinite"
        )


class LMInfiniteCache(Cache):
    """A cache whose every layer holds at most ``global_tokens + local_window`` unrotated keys.

    Build it with :func:`make_cache` and pass it as ``past_key_values`` to ``model(...)`` or
    ``model.generate(...)``; it stays bounded however long the conversation runs.
    """

    def __init__(self, model: nn.Module) -> None:
        base = _pretrained_model(model)
        modules = _attention_modules(base)
        binding = _BINDINGS.get(modules[0])
        if binding is None:
            raise LMInfiniteError(
                "make_cache(model) needs LM-Infinite enabled on the model; call "
                "icmem.lm_infinite.enable(model) (or use `with enabled(model):`) first"
            )
        self.config = binding.config
        self._rotary = binding.rotary
        self._modules = modules
        super().__init__(
            layers=[
                LMInfiniteLayer(self.config.global_tokens, self.config.local_window)
                for _ in modules
            ]
        )

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unrotate the new keys (they sit at the next positions), store them, and tell the
        layer's attention function which positions the returned keys hold."""
        layer = self.layers[layer_idx]
        start = layer.get_seq_length()
        positions = torch.arange(key_states.shape[-2], device=key_states.device) + start
        raw = _unrotate(key_states, *_cos_sin(self._rotary, positions, key_states.dtype))
        keys, values = layer.update(raw, value_states)
        _HANDOFF[self._modules[layer_idx]] = layer.returned_positions
        return keys, values


# ---------------------------------------------------------------------------------------------
# Public switches
# ---------------------------------------------------------------------------------------------


def _pretrained_model(model: nn.Module) -> PreTrainedModel:
    """The outermost transformers model inside ``model`` (a PeftModel wraps one)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise LMInfiniteError(
        f"{type(model).__name__} contains no transformers PreTrainedModel; pass a causal LM "
        "loaded with transformers (optionally wrapped by peft)"
    )


def _attention_modules(base: PreTrainedModel) -> list[nn.Module]:
    modules = [
        m
        for m in base.modules()
        if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "q_proj")
    ]
    modules.sort(key=lambda m: m.layer_idx)
    expected = base.config.get_text_config(decoder=True).num_hidden_layers
    if [m.layer_idx for m in modules] != list(range(expected)):
        raise LMInfiniteError(
            f"found {len(modules)} attention modules with q_proj in {type(base).__name__}, "
            f"expected one per layer ({expected}); LM-Infinite supports Llama-family models "
            "(Llama, Mistral, Qwen2, SmolLM2)"
        )
    return modules


def _rotary_module(base: PreTrainedModel) -> nn.Module:
    candidates = [
        m
        for m in base.modules()
        if "Rotary" in type(m).__name__ and isinstance(getattr(m, "inv_freq", None), torch.Tensor)
    ]
    if len(candidates) != 1:
        raise LMInfiniteError(
            f"expected one rotary embedding module in {type(base).__name__}, found "
            f"{len(candidates)}; LM-Infinite supports Llama-family RoPE models"
        )
    rotary = candidates[0]
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in _UNSUPPORTED_ROPE_TYPES:
        raise LMInfiniteError(
            f"rope_type={rope_type!r} changes its frequencies with sequence length, so distances "
            "cannot be capped consistently; use a model with static RoPE frequencies"
        )
    return rotary


def enable(
    model: nn.Module,
    *,
    global_tokens: int = 10,
    local_window: int | None = None,
    top_k_middle: int = 0,
    query_block: int = 512,
) -> LMInfiniteConfig:
    """Switch ``model`` (a transformers causal LM, or a PeftModel around one) to LM-Infinite.

    Calling it again changes the settings; :func:`disable` restores the previous attention.
    """
    base = _pretrained_model(model)
    if local_window is None:
        local_window = base.config.get_text_config(decoder=True).max_position_embeddings
    config = LMInfiniteConfig(
        local_window=local_window,
        global_tokens=global_tokens,
        top_k_middle=top_k_middle,
        query_block=query_block,
    )
    binding = _Binding(config=config, rotary=_rotary_module(base))
    modules = _attention_modules(base)
    if base not in _PREVIOUS_IMPLEMENTATION:
        _PREVIOUS_IMPLEMENTATION[base] = base.config._attn_implementation
    for module in modules:
        _BINDINGS[module] = binding
    base.set_attn_implementation(ATTN_IMPLEMENTATION)
    return config


def disable(model: nn.Module) -> None:
    """Restore the attention implementation ``model`` had before :func:`enable` (no-op if off)."""
    base = _pretrained_model(model)
    previous = _PREVIOUS_IMPLEMENTATION.pop(base, None)
    if previous is None:
        return
    for module in _attention_modules(base):
        _BINDINGS.pop(module, None)
        _HANDOFF.pop(module, None)
    base.set_attn_implementation(previous)


def is_enabled(model: nn.Module) -> bool:
    """Whether :func:`enable` is in effect on ``model``."""
    return _pretrained_model(model) in _PREVIOUS_IMPLEMENTATION


@contextmanager
def enabled(
    model: nn.Module,
    *,
    global_tokens: int = 10,
    local_window: int | None = None,
    top_k_middle: int = 0,
    query_block: int = 512,
) -> Iterator[LMInfiniteConfig]:
    """``with enabled(model): model.generate(...)``; restores the previous state on exit.

    If LM-Infinite was already on, its previous settings come back instead of turning it off.
    """
    base = _pretrained_model(model)
    previous = _BINDINGS.get(_attention_modules(base)[0]) if is_enabled(base) else None
    config = enable(
        model,
        global_tokens=global_tokens,
        local_window=local_window,
        top_k_middle=top_k_middle,
        query_block=query_block,
    )
    try:
        yield config
    finally:
        if previous is None:
            disable(model)
        else:
            old = previous.config
            enable(model, **{f.name: getattr(old, f.name) for f in fields(old)})


def make_cache(model: nn.Module) -> LMInfiniteCache:
    """A fresh bounded cache for ``model`` (LM-Infinite must be enabled)."""
    return LMInfiniteCache(model)
