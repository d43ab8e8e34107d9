"""LM-Infinite attention (Han et al., arXiv 2308.16137) for Llama-family models on transformers 5.

A model pretrained on sequences of length L breaks down past L for two reasons: queries meet
rotary distances they never saw, and attention spreads over more keys than it was trained on.
LM-Infinite fixes both without training, and this module does it through transformers' own
extension points (an ``AttentionInterface`` function, an ``AttentionMaskInterface`` function and
a ``Cache`` subclass): no modeling file is patched, and the parity tests against stock attention
catch a transformers release that changes those contracts.

Semantics (W = ``local_window``, g = ``global_tokens``, query at position i, key at position j):

* The Λ mask: the query attends to the last W tokens, itself included (``0 <= i - j < W``,
  exactly the span of one pretraining sequence), and to the first g tokens of the sequence
  (``j < g``) whatever the distance.
* The distance cap: the pair is rotated by ``min(i - j, W - 1)``, the largest distance seen in
  pretraining. Inside the window that is the true distance, so sequences of at most W tokens
  get exactly stock attention; a global token outside the window is seen at distance W - 1.
* ``local_window`` defaults to ``max_position_embeddings``, the pretraining length.

Where rotation happens. Llama-family attention rotates queries and keys by their absolute
position, with cos/sin computed in float32, before calling the attention function and the
cache. Those angles lose precision as positions grow without bound, so both are undone (with
the very cos/sin the model used, which makes the inverse exact) and redone with cos/sin computed
in float64 (:meth:`_Binding.exact_cos_sin`): relative angles then stay exact at any position.
Keys are rotated once, when they enter the cache, and never again.

:class:`LMInfiniteCache` keeps, per layer, the g global keys unrotated (they are rotated against
queries placed at W - 1, the cap) and the W most recent keys in a ring buffer: at most g + W
entries, forever. A generated token writes one slot, reads the ring once for its scores and
once for its values: O(W) time and O(1) extra memory, with no copy of the window. A prefill of
n tokens runs ``torch.nn.functional.scaled_dot_product_attention`` over query blocks with the
band mask, the global tokens folded into one extra key (see :func:`_prefill_attention`): O(n·W)
time and O(n) memory. The cache tells the attention function where its window starts (a
hand-off keyed by the attention module). Without it (no cache, or a stock ``DynamicCache``) the
keys the model passes are taken as rotated and contiguous up to the newest token, and only the
ones the Λ mask needs are re-rotated: results are the same, but memory is unbounded. Pass
``past_key_values=make_cache(model)`` to get the bounded cache.

Memory that stays in view. A cache made with ``make_cache(model, memory_positions=...)`` takes
its first forward call as a *memory block* (an ICAE's memory slots, task token and system turn,
at the position ids the caller passes, any increasing positions): that call is plain causal
attention, and its keys become the global entries of every later query, which sees them as if
it sat at ``min(i, W - 1)``, so the block keeps its own order and its distances, placed just
before the local window. The local window shrinks to ``W - E`` (E: one past the block's last
position), so every distance stays below W, the pretraining length. Within W positions this is
exactly stock attention over the same position ids; past it, old turns leave the window while
the memory stays at the distance it was read at in training.

Not supported: padded batches (they raise :class:`LMInfiniteError`; batch equal-length prompts or
run one sequence per call), RoPE types whose frequencies change with length ("dynamic",
"longrope"), and the paper's optional top-k middle tokens (``top_k_middle`` must stay 0: it needs
every middle key kept, which a bounded cache cannot do).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
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


class _Binding:
    """One model's LM-Infinite settings, shared by its attention modules and its caches."""

    def __init__(self, config: LMInfiniteConfig, rotary: nn.Module) -> None:
        self.config = config
        self.rotary = rotary
        # Every layer asks for the cos/sin of the same positions; compute them once per call.
        self._memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _remember(self, key: tuple, compute: Any) -> tuple[torch.Tensor, torch.Tensor]:
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) >= 16:
                self._memo.clear()
            found = self._memo[key] = compute()
        return found

    def model_cos_sin(
        self, start: int, length: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin the model itself rotated positions start.. with (to undo its rotation)."""

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            positions = torch.arange(start, start + length, device=device)
            return _cos_sin(self.rotary, positions, dtype)

        return self._remember(("model", start, length, dtype, device), compute)

    def exact_cos_sin(
        self, start: int, length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin (1, 1, length, D) of positions start.., from float64 angles.

        The model's own float32 angles drift by about position x 6e-8 radians; these stay exact
        to float32 rounding of the cos/sin values, so relative angles hold at any position.
        """

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            positions = torch.arange(start, start + length, device=device, dtype=torch.float64)
            inv_freq = self.rotary.inv_freq
            assert isinstance(inv_freq, torch.Tensor)  # _rotary_module binds no other module
            angles = positions[:, None] * inv_freq.to(device, torch.float64)
            angles = torch.cat((angles, angles), dim=-1)
            scale = float(getattr(self.rotary, "attention_scaling", 1.0))
            cos, sin = angles.cos() * scale, angles.sin() * scale
            return cos.float()[None, None], sin.float()[None, None]

        return self._remember(("exact", start, length, device), compute)


# Attention module -> its LM-Infinite settings; set by enable(), cleared by disable().
_BINDINGS: weakref.WeakKeyDictionary[nn.Module, _Binding] = weakref.WeakKeyDictionary()
# Attention module -> the _KeyWindow describing the keys LMInfiniteCache.update just returned.
_HANDOFF: weakref.WeakKeyDictionary[nn.Module, _KeyWindow] = weakref.WeakKeyDictionary()
# Model -> its attention modules in layer order (found once: enable() runs per decode step).
_ATTENTION_MODULES: weakref.WeakKeyDictionary[nn.Module, list[nn.Module]] = (
    weakref.WeakKeyDictionary()
)
# Model -> the attention implementation to restore on disable().
_PREVIOUS_IMPLEMENTATION: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


@dataclass
class _KeyWindow:
    """What the keys handed to the attention function hold.

    The window keys are rotated by their absolute positions (exactly) and cover ``start`` up to
    ``end - 1``: in position order for calls of several queries, possibly in ring order for a
    single query (which sees all of them, so their order does not matter). The global keys are
    unrotated and cover positions ``0 .. len - 1``.
    """

    start: int
    end: int
    global_keys: torch.Tensor
    global_values: torch.Tensor
    # Memory mode (see the module docstring): the globals are rotated at their own positions and
    # always visible, and the window is ``width`` wide; ``block`` marks the memory block's call.
    ordered: bool = False
    width: int | None = None
    block: bool = False


@dataclass
class _CappedGlobals:
    """The global keys some query of a call sees beyond its window, their values, and the
    queries rotated to read them at the capped distance (all float32)."""

    queries: torch.Tensor  # (B, H, n, D)
    keys: torch.Tensor  # (B, Hkv, g, D)
    values: torch.Tensor  # (B, Hkv, g, D)


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
    """x·cos + rotate_half(x)·sin, in float32, written once into a fresh tensor."""
    x = x.float()
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


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, m, D) -> (B, Hkv, G·m, D): the G query heads sharing a key head become rows."""
    batch, heads, m, dim = x.shape
    return x.reshape(batch, kv_heads, heads // kv_heads * m, dim)


def _lambda_attention(
    query: torch.Tensor,  # (B, H, n, D), unrotated
    key: torch.Tensor,  # (B, Hkv, T, D), rotated at absolute positions, see _KeyWindow
    value: torch.Tensor,  # (B, Hkv, T, D)
    window: _KeyWindow,
    binding: _Binding,
    scaling: float,
) -> torch.Tensor:
    """Returns (B, n, H, D) for queries at positions ``window.end - n`` .. ``window.end - 1``."""
    config = binding.config
    n = query.shape[-2]
    first = window.end - n
    device = query.device
    cap = config.local_window - 1
    q = _rotate(query, *binding.exact_cos_sin(first, n, device)).mul_(scaling)
    capped: _CappedGlobals | None = None
    if window.ordered:
        n_global = window.global_keys.shape[-2]
        if n_global:
            # Each query reads the memory from min(i, W - 1): true distances inside the
            # pretraining length, the distances of position W - 1 beyond it.
            below = max(0, min(n, cap - first))
            cos, sin = binding.exact_cos_sin(first, below, device)
            cap_cos, cap_sin = binding.exact_cos_sin(cap, 1, device)
            cos = torch.cat((cos, cap_cos.expand(-1, -1, n - below, -1)), -2)
            sin = torch.cat((sin, cap_sin.expand(-1, -1, n - below, -1)), -2)
            capped = _CappedGlobals(
                _rotate(query, cos, sin).mul_(scaling),
                window.global_keys.float(),
                window.global_values.float(),
            )
    else:
        # Global tokens some query of this call sees beyond its window: j <= last query - W.
        n_global = min(window.global_keys.shape[-2], max(0, window.end - config.local_window))
        if n_global:
            capped = _CappedGlobals(
                _rotate(query, *binding.exact_cos_sin(cap, 1, device)).mul_(scaling),
                _rotate(window.global_keys[:, :, :n_global], *binding.exact_cos_sin(0, 1, device)),
                window.global_values[:, :, :n_global].float(),
            )
    if n == 1:
        out = _decode_attention(q, key, value, capped)
    else:
        width = window.width or config.local_window
        out = _prefill_attention(q, key, value, window, capped, width, config.query_block)
    return out.to(value.dtype).transpose(1, 2)


def _block_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The memory block's own call: causal attention over keys the model rotated itself at the
    caller's position ids (all below W, so stock attention is exact there)."""
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key.repeat_interleave(groups, dim=1),
        value.repeat_interleave(groups, dim=1),
        is_causal=True,
        scale=scaling,
    )
    return out.transpose(1, 2)


def _decode_attention(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    capped: _CappedGlobals | None,
) -> torch.Tensor:
    """One query that sees every window key: read the keys once for the scores and the values
    once for the output, in the cache's dtype like eager attention (softmax in float32), with
    no copy of the window."""
    batch, heads, _, dim = q.shape
    kv_heads = key.shape[1]
    scores = (_grouped(q, kv_heads).to(key.dtype) @ key.transpose(-1, -2)).float()
    if capped is not None:
        global_scores = _grouped(capped.queries, kv_heads) @ capped.keys.transpose(-1, -2)
        scores = torch.cat((global_scores, scores), dim=-1)
    weights = torch.softmax(scores, dim=-1)
    n_global = 0 if capped is None else capped.keys.shape[-2]
    out = (weights[..., n_global:].to(value.dtype) @ value).float()
    if capped is not None:
        out += weights[..., :n_global] @ capped.values
    return out.view(batch, heads, 1, dim)


def _prefill_attention(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: _KeyWindow,
    capped: _CappedGlobals | None,
    width: int,
    query_block: int,
) -> torch.Tensor:
    """Queries in blocks, each block one fused ``scaled_dot_product_attention`` call.

    Window and capped global scores need one shared softmax, but the two use different query
    rotations, so the globals cannot simply join the keys. Instead, for each query row the
    globals are first reduced to their log-sum-exp ``L`` and their softmax-weighted value
    ``o_g``; then one extra key joins the window, with score ``L`` (carried by an extra query
    dimension against a key that is 1 there) and a value that is 1 in an extra dimension. The
    fused call returns the window's output already renormalised in the first D dimensions and
    the globals' share in the extra one, so the result is ``out[:D] + out[D] * o_g``.
    """
    batch, heads, n, dim = q.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    first_query = window.end - n
    device = q.device
    out = torch.empty(batch, heads, n, dim, dtype=torch.float32, device=device)
    for start in range(0, n, query_block):
        stop = min(n, start + query_block)
        rows = stop - start
        q_pos = torch.arange(first_query + start, first_query + stop, device=device)
        lo = max(0, int(q_pos[0]) - width + 1 - window.start)
        hi = int(q_pos[-1]) + 1 - window.start
        k_pos = torch.arange(window.start + lo, window.start + hi, device=device)
        distance = q_pos[:, None] - k_pos[None, :]
        mask = torch.zeros(rows, hi - lo + 1, device=device)
        mask[:, :-1].masked_fill_((distance < 0) | (distance >= width), float("-inf"))

        keys = torch.zeros(batch, kv_heads, hi - lo + 1, dim + 1, device=device)
        keys[:, :, :-1, :dim] = key[:, :, lo:hi]
        keys[:, :, -1, dim] = 1.0
        values = torch.zeros_like(keys)
        values[:, :, :-1, :dim] = value[:, :, lo:hi]
        values[:, :, -1, dim] = 1.0
        queries = torch.zeros(batch, kv_heads, groups * rows, dim + 1, device=device)
        queries[..., :dim] = _grouped(q[:, :, start:stop], kv_heads)

        sees_global = torch.zeros(rows, dtype=torch.bool, device=device)
        global_out: torch.Tensor | None = None
        if capped is not None:
            n_global = capped.keys.shape[-2]
            if window.ordered:  # the memory is visible to every query
                beyond = torch.ones(rows, n_global, dtype=torch.bool, device=device)
            else:
                g_pos = torch.arange(n_global, device=device)
                beyond = (q_pos[:, None] - g_pos[None, :]) >= width
            block_queries = _grouped(capped.queries[:, :, start:stop], kv_heads)
            global_scores = block_queries @ capped.keys.transpose(-1, -2)
            global_scores.masked_fill_(~beyond.repeat(groups, 1), float("-inf"))
            sees_global = beyond.any(dim=-1)
            log_total = torch.logsumexp(global_scores, dim=-1, keepdim=True)
            safe = torch.where(torch.isfinite(log_total), log_total, torch.zeros_like(log_total))
            global_out = (global_scores - safe).exp_() @ capped.values
            queries[..., dim : dim + 1] = safe
        mask[:, -1].masked_fill_(~sees_global, float("-inf"))
        fused = torch.nn.functional.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask.repeat(groups, 1), scale=1.0
        )
        block = fused[..., :dim]
        if global_out is not None:
            block = block + fused[..., dim : dim + 1] * global_out
        out[:, :, start:stop] = block.reshape(batch, heads, rows, dim)
    return out


def _window_from_model_keys(
    key: torch.Tensor, value: torch.Tensor, first_query: int, end: int, binding: _Binding
) -> tuple[torch.Tensor, torch.Tensor, _KeyWindow]:
    """Keys straight from the model (no cache, or a stock cache): rotated by the model at
    positions ``end - T .. end - 1``. Keep what the Λ mask needs, in this module's form."""
    config = binding.config
    total = key.shape[-2]
    oldest = end - total
    if config.global_tokens and oldest > 0:
        raise LMInfiniteError(
            "the cache passed to the model has dropped the first tokens that LM-Infinite "
            "keeps as global tokens (a sliding-window cache?); pass "
            "past_key_values=icmem.lm_infinite.make_cache(model)"
        )
    start = max(oldest, first_query - config.local_window + 1)
    window_keys = key[:, :, start - oldest :]
    raw = _unrotate(window_keys, *binding.model_cos_sin(start, end - start, key.dtype, key.device))
    rotated = _rotate(raw, *binding.exact_cos_sin(start, end - start, key.device)).to(key.dtype)
    n_global = min(config.global_tokens, total)  # _lambda_attention picks those beyond the window
    global_keys = _unrotate(
        key[:, :, :n_global], *binding.model_cos_sin(0, n_global, key.dtype, key.device)
    )
    window = _KeyWindow(start, end, global_keys, value[:, :, :n_global])
    return rotated, value[:, :, start - oldest :], window


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
    window = _HANDOFF.pop(module, None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if window is not None and window.block:
        return _block_attention(query, key, value, scale).contiguous(), None
    positions = position_ids.reshape(-1, n)
    query_positions = positions[0]
    first = int(query_positions[0])
    expected = first + torch.arange(n, device=query_positions.device)
    if not (torch.equal(query_positions, expected) and bool((positions == query_positions).all())):
        raise LMInfiniteError(
            "LM-Infinite attention needs consecutive positions shared by every batch row "
            "(no padding, no packed sequences); pass plain unpadded inputs"
        )

    if window is None:
        key, value, window = _window_from_model_keys(key, value, first, first + n, binding)
    elif window.end != first + n:
        raise LMInfiniteError(
            f"position_ids start at {first} but the LM-Infinite cache placed these tokens at "
            f"{window.end - n}; do not pass explicit position_ids that skip or repeat positions "
            "with this cache"
        )

    query = _unrotate(query, *binding.model_cos_sin(first, n, query.dtype, query.device))
    output = _lambda_attention(query, key, value, window, binding, scale)
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


class LMInfiniteLayer(CacheLayerMixin):
    """One layer's keys and values: the first g tokens, and the W most recent in a ring.

    ``keys``/``values`` are the ring (exactly rotated keys; position p lives in slot
    (p - origin) mod W, and the ring grows by doubling up to W slots); ``global_keys``/
    ``global_values`` hold the first g tokens unrotated. With a memory block (``memory``: its
    position ids) the globals are the block's keys as the model rotated them, the ring starts
    after the block (``origin``) and is ``W - origin`` wide. ``get_seq_length`` counts every
    position seen (as transformers expects, to place new tokens); :meth:`held_positions` lists
    what is actually kept.
    """

    is_croppable = False

    def __init__(self, binding: _Binding, memory: tuple[int, ...] = ()) -> None:
        super().__init__()
        self._binding = binding
        self.memory = memory
        self.origin = memory[-1] + 1 if memory else 0
        self.global_tokens = 0 if memory else binding.config.global_tokens
        self.local_window = binding.config.local_window - self.origin
        self.seen_tokens = 0
        self.global_keys: torch.Tensor | None = None
        self.global_values: torch.Tensor | None = None
        self.last_window: _KeyWindow | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :].clone()  # (B, Hkv, 0, D)
        self.values = value_states[..., :0, :].clone()
        self.global_keys, self.global_values = self.keys.clone(), self.values.clone()
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store unrotated keys at the next positions; return the window the new queries see.

        One new token gets a view of the ring (no copy); several get the old window and the
        new keys concatenated in position order (a copy of O(W + n), once per call).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        global_keys, global_values = self._globals()
        start, n = self.seen_tokens, key_states.shape[-2]
        end = start + n
        origin = self.origin
        if start < self.global_tokens:
            take = min(n, self.global_tokens - start)
            global_keys = torch.cat((global_keys, key_states[..., :take, :]), -2)
            global_values = torch.cat((global_values, value_states[..., :take, :]), -2)
            self.global_keys, self.global_values = global_keys, global_values
        device = key_states.device
        rotated = _rotate(key_states, *self._binding.exact_cos_sin(start, n, device))
        rotated = rotated.to(key_states.dtype)
        if n > 1:
            window_start = max(origin, start - self.local_window + 1)
            old_keys, old_values = self._ordered(window_start - origin, start - origin)
            keys = torch.cat((old_keys, rotated), -2)
            values = torch.cat((old_values, value_states), -2)
        self._store(rotated, value_states, start - origin)
        self.seen_tokens = end
        if n == 1:
            held = min(end - origin, self.local_window)
            window_start = end - held
            ring_keys, ring_values = self._ring()
            keys, values = ring_keys[..., :held, :], ring_values[..., :held, :]
        self.last_window = _KeyWindow(
            window_start,
            end,
            global_keys,
            global_values,
            ordered=bool(self.memory),
            width=self.local_window,
        )
        return keys, values

    def store_memory(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the memory block's keys (rotated by the model at the block's positions) as this
        layer's global entries; the block's own queries attend causally among them."""
        if self.is_initialized or len(self.memory) != key_states.shape[-2]:
            raise LMInfiniteError(
                f"a cache made with {len(self.memory)} memory positions takes them as its first "
                f"forward call, got {key_states.shape[-2]} tokens"
                + (" after earlier calls" if self.is_initialized else "")
                + "; feed the memory block alone first, then the conversation"
            )
        self.lazy_initialization(key_states, value_states)
        self.global_keys, self.global_values = key_states, value_states
        self.seen_tokens = self.origin
        self.last_window = _KeyWindow(
            0, self.origin, key_states, value_states, ordered=True, block=True
        )
        return key_states, value_states

    def _ring(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring's keys and values (only read once the layer is initialized)."""
        assert self.keys is not None and self.values is not None  # set by lazy_initialization
        return self.keys, self.values

    def _globals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The global keys and values (only read once the layer is initialized)."""
        assert self.global_keys is not None and self.global_values is not None
        return self.global_keys, self.global_values

    def _slots(self, first: int, stop: int) -> list[tuple[int, int]]:
        """Ring slot ranges holding ring positions first .. stop - 1 (counted from ``origin``),
        in position order."""
        if stop <= first:
            return [(0, 0)]
        begin = first % self.local_window
        count = stop - first
        head = min(count, self.local_window - begin)
        return [(begin, begin + head)] + ([(0, count - head)] if count > head else [])

    def _ordered(self, first: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        ring_keys, ring_values = self._ring()
        slots = self._slots(first, stop)
        if len(slots) == 1:
            ((a, b),) = slots
            return ring_keys[..., a:b, :], ring_values[..., a:b, :]
        return (
            torch.cat([ring_keys[..., a:b, :] for a, b in slots], -2),
            torch.cat([ring_values[..., a:b, :] for a, b in slots], -2),
        )

    def _store(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        ring_keys, ring_values = self._ring()
        end = start + keys.shape[-2]
        needed = min(end, self.local_window)
        capacity = ring_keys.shape[-2]
        if capacity < needed:  # below W slots, position p sits in slot p: grow in order
            size = min(self.local_window, max(needed, 2 * capacity))
            grown_keys = ring_keys.new_empty((*ring_keys.shape[:-2], size, ring_keys.shape[-1]))
            grown_values = ring_values.new_empty(
                (*ring_values.shape[:-2], size, ring_values.shape[-1])
            )
            grown_keys[..., :start, :] = ring_keys[..., :start, :]
            grown_values[..., :start, :] = ring_values[..., :start, :]
            ring_keys, ring_values = grown_keys, grown_values
            self.keys, self.values = ring_keys, ring_values
        kept = min(keys.shape[-2], self.local_window)
        offset = keys.shape[-2] - kept
        for a, b in self._slots(end - kept, end):
            ring_keys[..., a:b, :] = keys[..., offset : offset + b - a, :]
            ring_values[..., a:b, :] = values[..., offset : offset + b - a, :]
            offset += b - a

    def held_positions(self) -> list[int]:
        """Positions whose keys this layer keeps: the global tokens, then the ring's window."""
        n_global = 0 if self.global_keys is None else self.global_keys.shape[-2]
        ring = min(self.seen_tokens - self.origin, self.local_window)
        held = range(self.seen_tokens - ring, self.seen_tokens) if ring > 0 else range(0)
        memory = list(self.memory) if self.memory and n_global else list(range(n_global))
        return [*memory, *held]

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return (len(self.memory) or self.global_tokens) + self.local_window

    def reset(self) -> None:
        self.keys = self.values = self.global_keys = self.global_values = None
        self.last_window = None
        self.seen_tokens = 0
        self.is_initialized = False

    def _map_batch(self, select: Any) -> None:
        if self.is_initialized:
            self.keys, self.values = select(self.keys), select(self.values)
            self.global_keys, self.global_values = (
                select(self.global_keys),
                select(self.global_values),
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise LMInfiniteError(
            "LMInfiniteCache cannot be cropped (dropped keys are gone); assisted or speculative "
            "decoding is not supported with LM-Infinite"
        )


class LMInfiniteCache(Cache):
    """A cache whose every layer holds at most ``global_tokens + local_window`` keys.

    Build it with :func:`make_cache` and pass it as ``past_key_values`` to ``model(...)`` or
    ``model.generate(...)``; it stays bounded however long the conversation runs.
    """

    def __init__(self, model: nn.Module, memory_positions: Sequence[int] = ()) -> None:
        base = _pretrained_model(model)
        modules = _attention_modules(base)
        binding = _BINDINGS.get(modules[0])
        if binding is None:
            raise LMInfiniteError(
                "make_cache(model) needs LM-Infinite enabled on the model; call "
                "icmem.lm_infinite.enable(model) (or use `with enabled(model):`) first"
            )
        memory = tuple(int(p) for p in memory_positions)
        if memory:
            _check_memory_positions(memory, binding.config.local_window)
        self.config = binding.config
        self.memory_positions = memory
        self._binding = binding
        self._modules = modules
        super().__init__(layers=[LMInfiniteLayer(binding, memory) for _ in modules])

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Undo the model's rotation of the new keys (they sit at the next positions), store
        them, and tell the layer's attention function what the returned keys hold."""
        layer = self.layers[layer_idx]
        assert isinstance(layer, LMInfiniteLayer)  # __init__ builds no other layers
        if self.memory_positions and not layer.is_initialized:
            keys, values = layer.store_memory(key_states, value_states)
            self._hand_off(layer_idx, layer)
            return keys, values
        cos_sin = self._binding.model_cos_sin(
            layer.get_seq_length(), key_states.shape[-2], key_states.dtype, key_states.device
        )
        keys, values = layer.update(_unrotate(key_states, *cos_sin), value_states)
        self._hand_off(layer_idx, layer)
        return keys, values

    def _hand_off(self, layer_idx: int, layer: LMInfiniteLayer) -> None:
        """Tell the layer's attention function what the keys its update returned hold."""
        assert layer.last_window is not None  # every update sets it
        _HANDOFF[self._modules[layer_idx]] = layer.last_window


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
    found = _ATTENTION_MODULES.get(base)
    if found is None:
        found = _ATTENTION_MODULES[base] = _find_attention_modules(base)
    return found


def _find_attention_modules(base: PreTrainedModel) -> list[nn.Module]:
    indexed = sorted(
        (
            (index, m)
            for m in base.modules()
            if isinstance(index := getattr(m, "layer_idx", None), int) and hasattr(m, "q_proj")
        ),
        key=lambda pair: pair[0],
    )
    modules = [m for _, m in indexed]
    expected = base.config.get_text_config(decoder=True).num_hidden_layers
    if [index for index, _ in indexed] != list(range(expected)):
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
    binding = _Binding(config, _rotary_module(base))
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


def make_cache(model: nn.Module, memory_positions: Sequence[int] = ()) -> LMInfiniteCache:
    """A fresh bounded cache for ``model`` (LM-Infinite must be enabled).

    ``memory_positions`` makes the first forward call a memory block at those position ids (see
    the module docstring): pass them as that call's ``position_ids``; later calls continue at
    one past the last of them.
    """
    return LMInfiniteCache(model, memory_positions)


def _check_memory_positions(positions: tuple[int, ...], window: int) -> None:
    if any(b <= a for a, b in itertools.pairwise(positions)) or positions[0] < 0:
        raise LMInfiniteError(
            "memory_positions must be increasing and non-negative, got "
            f"{list(positions[:8])}...; pass the position ids the memory block is read at"
        )
    if positions[-1] + 1 >= window:
        raise LMInfiniteError(
            f"the memory block reaches position {positions[-1]}, but the local window is "
            f"{window} positions and the block must leave room for the conversation; recall "
            "fewer spans or use a model with a longer context"
        )
