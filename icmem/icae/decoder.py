"""The one decoding room: where a token is chosen, and the decoder state it is chosen in.

``next_token`` is the only place a token is picked from logits (greedy, temperature, top-k,
top-p, repetition penalty, no-repeat n-grams) and ``sample_tokens`` the only sampling loop:
stop ids, constraints, loop detection and the finish reason live there. A :class:`Decoder`
owns the state every decode runs in: which weights decode (the PEFT model with the decoder
adapter on, or an adapter-free copy sharing the base weights), the lock that keeps threads
from switching adapters under each other, and LM-Infinite. ``ICAE.generate``, conversation
sessions, the pipeline, ``ChatICAE``, ``icmem chat`` and the evaluations all decode through it;
a plain model decoded from token ids in batches (the distillation teacher, the passkey
evaluation) runs the same loop per row through ``icmem.icae.batch_decode``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

from icmem.icae.errors import ICAEConfigError
from icmem.icae.int8_linear import quantize_linears
from icmem.icae.text import decode_text

if TYPE_CHECKING:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import PreTrainedTokenizerBase

    from icmem.constrained import JsonConstraint
    from icmem.icae.model import ICAE

FinishReason = Literal["stop", "length", "repetition"]
ENCODER_ADAPTER = "default"  # peft's name for the first adapter
DECODER_ADAPTER = "decoder"
# A reply stops as a loop only once its repeated copies cover this many tokens: short runs
# ("ha ha ha", a row of dashes) are text, a sentence said three times over is a loop.
REPEAT_MIN_TOKENS = 16
REPEAT_MAX_PERIOD = 128  # longest repeated stretch looked for, in tokens


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. ``temperature=0`` is greedy; ``seed`` makes sampling repeatable.

    The loop remedies: ``repetition_penalty`` (> 1) divides positive and multiplies negative
    logits of tokens already generated (Keskar et al., 2019, as transformers does);
    ``no_repeat_ngram_size`` n bans any token that would repeat an n-gram of the reply;
    ``repeat_stop`` c ends a reply whose last tokens are c copies of one stretch (covering at
    least ``REPEAT_MIN_TOKENS``), with the finish reason ``"repetition"``. All off by default,
    which is plain greedy decoding, token for token. ``min_new_tokens`` keeps stop tokens out
    of the first choices (benchmarks that must time a given number of tokens)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repeat_stop: int = 0
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ICAEConfigError(f"temperature={self.temperature}; use 0 (greedy) or more")
        if self.top_k < 0:
            raise ICAEConfigError(f"top_k={self.top_k}; use 0 (off) or a positive count")
        if not 0.0 < self.top_p <= 1.0:
            raise ICAEConfigError(f"top_p={self.top_p}; use a value in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ICAEConfigError(
                f"repetition_penalty={self.repetition_penalty}; use 1.0 (off) or a value > 1"
            )
        if self.no_repeat_ngram_size < 0:
            raise ICAEConfigError(
                f"no_repeat_ngram_size={self.no_repeat_ngram_size}; use 0 (off) or 1 or more"
            )
        if self.min_new_tokens < 0:
            raise ICAEConfigError(f"min_new_tokens={self.min_new_tokens}; use 0 or more")
        if self.repeat_stop < 0 or self.repeat_stop == 1:
            raise ICAEConfigError(
                f"repeat_stop={self.repeat_stop}; use 0 (off) or 2 or more copies"
            )

    def with_overrides(self, **settings: Any) -> Sampling:
        """These settings with some fields replaced (None leaves a field as it is)."""
        return replace(self, **{k: v for k, v in settings.items() if v is not None})


GREEDY = Sampling()
# What ``MemoryPipeline.reply`` decodes with unless told otherwise: greedy, but a reply that
# starts saying the same thing over and over ends there, reported as "repetition".
REPLY_SAMPLING = Sampling(repeat_stop=3)
# For conversation: light sampling plus the remedies, so a reply neither loops nor is cut
# short by a repeated phrase. Greedy stays one argument away (temperature=0 and the rest off).
CHAT_SAMPLING = Sampling(
    temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1, repeat_stop=3
)


def next_token(
    logits: torch.Tensor,
    sampling: Sampling,
    generator: torch.Generator | None = None,
    history: Sequence[int] = (),
) -> int:
    """Choose the next token from ``(V,)`` float logits after the reply's ``history``."""
    if sampling.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), device=logits.device)
        chosen = logits[seen]
        penalty = sampling.repetition_penalty
        logits = logits.index_put(
            (seen,), torch.where(chosen > 0, chosen / penalty, chosen * penalty)
        )
    n = sampling.no_repeat_ngram_size
    if n and len(history) >= n - 1:
        banned = _ngram_completions(history, n)
        if banned:
            logits = logits.index_fill(0, torch.tensor(banned, device=logits.device), float("-inf"))
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= sampling.top_p  # keep the first past p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def _ngram_completions(history: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already in ``history`` (its last n - 1 tokens
    followed by one of them)."""
    if n == 1:
        return sorted(set(history))
    prefix = tuple(history[len(history) - n + 1 :])
    return sorted(
        {
            history[i + n - 1]
            for i in range(len(history) - n + 1)
            if tuple(history[i : i + n - 1]) == prefix
        }
    )


def repeats_itself(history: Sequence[int], copies: int) -> bool:
    """Whether ``history`` ends in ``copies`` copies of one stretch of tokens that together
    cover at least ``REPEAT_MIN_TOKENS`` tokens."""
    for period in range(1, min(REPEAT_MAX_PERIOD, len(history) // copies) + 1):
        span = period * copies
        if span < REPEAT_MIN_TOKENS:
            continue
        unit = list(history[-period:])
        if list(history[-span:]) == unit * copies:
            return True
    return False


class TokenStream(Iterator[int]):
    """Token ids as they are chosen; once exhausted, ``finish_reason`` says why it ended:
    ``"stop"`` (a stop token, then in ``stop_token``), ``"length"`` (the token budget) or
    ``"repetition"`` (the reply started repeating itself, see ``Sampling.repeat_stop``)."""

    def __init__(self, run: Callable[[TokenStream], Iterator[int]]) -> None:
        self.finish_reason: FinishReason | None = None
        self.stop_token: int | None = None
        self._tokens = run(self)

    def __next__(self) -> int:
        return next(self._tokens)

    def close(self) -> None:
        """Stop early (runs the loop's cleanup, such as releasing a session)."""
        close = getattr(self._tokens, "close", None)
        if close is not None:
            close()


class TextStream(Iterator[str]):
    """Text pieces of a :class:`TokenStream`, holding back incomplete UTF-8 characters; its
    ``finish_reason`` once exhausted."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, tokens: TokenStream) -> None:
        self.tokens = tokens
        self._pieces = _pieces(tokenizer, tokens)

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.tokens.finish_reason

    def __next__(self) -> str:
        return next(self._pieces)


def _pieces(tokenizer: PreTrainedTokenizerBase, token_ids: Iterable[int]) -> Iterator[str]:
    ids: list[int] = []
    emitted = ""
    for token in token_ids:
        ids.append(token)
        text = decode_text(tokenizer, ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted) :]
            emitted = text
    text = decode_text(tokenizer, ids, skip_special_tokens=True)
    if len(text) > len(emitted):
        yield text[len(emitted) :]


def sample_tokens(
    first: torch.Tensor,
    step: Callable[[int], torch.Tensor],
    *,
    max_new_tokens: int,
    sampling: Sampling,
    stop_ids: frozenset[int],
    constraint: JsonConstraint | None = None,
) -> TokenStream:
    """The sampling loop: choose a token from ``first`` (the prefix's last logits), then from
    ``step(token)`` (the logits after reading it), until a stop id, ``max_new_tokens``, or a
    reply that repeats itself. ``constraint`` masks each step's logits (JSON schemas, tool
    calls). The stop id is not yielded."""

    def run(stream: TokenStream) -> Iterator[int]:
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=first.device).manual_seed(sampling.seed)
        history: list[int] = []
        logits = first
        for count in range(max_new_tokens):
            scores = logits.float()
            if constraint is not None or count < sampling.min_new_tokens:
                scores = scores.clone()
            if count < sampling.min_new_tokens and stop_ids:
                scores[list(stop_ids)] = float("-inf")
            if constraint is not None:
                constraint.mask_(scores)
            token = next_token(scores, sampling, generator, history)
            if constraint is not None:
                constraint.accept(token)
            if token in stop_ids:
                stream.finish_reason, stream.stop_token = "stop", token
                return
            history.append(token)
            yield token
            if sampling.repeat_stop and repeats_itself(history, sampling.repeat_stop):
                stream.finish_reason = "repetition"
                return
            if count + 1 < max_new_tokens:
                logits = step(token)
        stream.finish_reason = "length"

    return TokenStream(run)


class Decoder:
    """The decoder of one ICAE: its weights, their switching and lock, and LM-Infinite.

    The decoder reads memory with the decoder's own adapter on (when the config has one):
    through a copy of the base model with that adapter merged into its weights (one more set
    of weights in memory; peft's wrappers cost a step 1.4x the merged copy and switching
    adapters 19 ms per streamed token, ``benchmarks/decoder_step_overhead.py``), or with
    ``merge_adapter = False`` through the PEFT model itself. Everything else (no memory, or
    no decoder adapter) reads through a copy of the PEFT model's structure that shares every
    parameter and buffer with it and has its LoRA layers unloaded: switched off, peft's
    wrappers still cost a decode step about 1.1-1.3x the bare modules. Adapters and
    LM-Infinite are process-wide switches of a module, so every forward that depends on them
    holds ``lock``: two threads decoding at once take turns per forward call instead of
    switching adapters under each other, and ``compress`` copies the PEFT model between them.
    """

    def __init__(self, icae: ICAE) -> None:
        self.icae = icae
        self.lock = threading.RLock()
        # Derived copies by (merged, dtype, int8), as (key, module): never saved, moved or
        # trained.
        self._copies: dict[tuple[Any, ...], tuple[tuple[Any, ...], nn.Module]] = {}
        self.merge_adapter = True  # False: decode through peft's wrappers (no extra weights)
        # None: the model's dtype; a name ("float32", "bfloat16") forces it (see ``dtype``).
        self.decode_dtype: str | None = None
        # Opt-in, not exact: the decoding copies' Linear weights in int8 (see ``model``).
        self.int8_weights = False
        # Opt-in: answers below the window run compiled copies (see ``step_module``).
        self.compile_steps = False
        self._compiled: dict[tuple[Any, ...], nn.Module] = {}
        self._tuner_layer_cache: list[BaseTunerLayer] | None = None
        self._adapter_parameter_cache: list[torch.Tensor] | None = None

    # ----------------------------------------------------------------- weights

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the decoder's copies decode in: the model's, unless ``decode_dtype``
        forces another. A decode step alone reads fewer bytes in bf16, so it runs faster there
        even on some AVX2-only CPUs (1.28x on two threads of a 2-core EPYC, slower on one,
        ``benchmarks/results/decode_step_options.json``); but a copy also reads the whole
        prefix (slots and prompt) first, and that prefill, a matrix product over hundreds of
        positions, runs about 6x slower in emulated bf16, more than tens of faster steps win
        back. So ``"auto"`` decodes in bf16 where the model runs in it (bf16 hardware), and a
        caller whose answers are long can set ``decode_dtype = "bfloat16"``."""
        if self.decode_dtype is not None:
            return getattr(torch, self.decode_dtype)
        return self.icae.dtype

    def uses_adapter(self, memory: bool) -> bool:
        """Whether decoding (with or without memory) runs the decoder's own adapter."""
        return memory and bool(self.icae.config.decoder_lora_rank)

    def model(self, memory: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
        """The module that decodes (see the class docstring), in ``dtype`` (by default the
        decoder's ``dtype``). Copies are built on first use and rebuilt when the model moves to
        another device or dtype, or (the merged one) when the decoder adapter's weights change.
        A copy in another dtype than the model's holds weights of its own.

        With ``int8_weights`` (opt-in) the copies' Linear layers, the output head included,
        hold weight-only int8 (``icmem.icae.int8_linear``): a decode step reads about a quarter
        of fp32's bytes, and answers differ slightly from the float decoder's, so it stays off
        by default and out of the exactness tests."""
        merged = self.uses_adapter(memory)
        if merged and not self.merge_adapter:
            return self.icae.model
        int8 = self.int8_weights
        dtype = torch.float32 if int8 else self.dtype if dtype is None else dtype
        key: tuple[Any, ...] = (self.icae.device, self.icae.dtype)
        if merged:
            key += tuple(p._version for p in self._adapter_parameters())
        with self.lock:  # copy between decoder forwards, as the encoder's copy is made
            held = self._copies.get((merged, dtype, int8))
            if held is None or held[0] != key:
                self._copies.pop((merged, dtype, int8), None)  # free the stale copy first
                if merged:
                    module = self.icae.merged_copy(DECODER_ADAPTER).to(dtype)
                else:
                    module = self.icae.adapter_free_copy(dtype)
                if int8:
                    module = quantize_linears(module)
                held = self._copies[(merged, dtype, int8)] = (key, module)
            return held[1]

    def step_module(
        self, memory: bool, long_context: bool, dtype: torch.dtype | None = None
    ) -> nn.Module:
        """The module a decode calls: ``model``'s copy, or with ``compile_steps`` (opt-in) that
        copy through ``torch.compile``. A compiled step ran 1.23x the eager one in fp32 and 2.6x
        with int8 weights (``benchmarks/results/decode_step_options.json``), but the first
        answer pays the compilation (3.5 minutes cold on two cores, about 40 s once PyTorch's disk
        cache holds it), so it serves a long-running server. LM-Infinite's attention
        (past the window) and the PEFT model itself stay eager."""
        module = self.model(memory, dtype)
        if not self.compile_steps or long_context or module is self.icae.model:
            return module
        kind = (self.uses_adapter(memory), input_dtype(module), self.int8_weights)
        with self.lock:
            held = self._compiled.get(kind)
            if held is None or cast(Any, held)._orig_mod is not module:
                held = self._compiled[kind] = cast(nn.Module, torch.compile(module, dynamic=True))
            return held

    def new_cache(self, module: nn.Module, long_context: bool) -> Any:
        """A fresh key/value cache for ``module`` (from ``step_module``): LM-Infinite's past
        the window, else the stock cache growing in place, or for a compiled module the stock
        cache itself (the growing cache's Python checks would split the compiled graph)."""
        if long_context:
            return _lm_infinite().make_cache(module)
        from transformers import DynamicCache

        from icmem.icae.kv_cache import growing_cache  # imports transformers

        config = cast(Any, module).config
        if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            return DynamicCache(config=config)
        return growing_cache(config)

    def _adapter_parameters(self) -> list[torch.Tensor]:
        if self._adapter_parameter_cache is None:
            marker = f".{DECODER_ADAPTER}."
            self._adapter_parameter_cache = [
                p for n, p in self.icae.model.named_parameters() if "lora_" in n and marker in n
            ]
        return self._adapter_parameter_cache

    @contextmanager
    def weights(self, memory: bool = True) -> Iterator[None]:
        """The PEFT model set up to decode, under the lock: the decoder adapter on when it
        applies, else every adapter off (the base model). Training reads through it too."""
        with self.lock:
            if self.uses_adapter(memory):
                self._activate(DECODER_ADAPTER)
                try:
                    yield
                finally:
                    self._activate(ENCODER_ADAPTER)
            else:
                with self._adapters_off():
                    yield

    @contextmanager
    def state(
        self,
        long_context: bool,
        memory: bool = True,
        window: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> Iterator[nn.Module]:
        """No gradients, eval mode, the decoder's weights (in ``dtype``, see ``model``) and, if
        asked, LM-Infinite attention (``window``: its local window, by default the model's
        pretraining length); yields the module to call."""
        decoder = self.step_module(memory, long_context, dtype)
        # The adapter-free decoder has no adapter to switch; the lock still keeps one thread's
        # LM-Infinite switch out of another's forward call.
        weights = self.weights(memory) if decoder is self.icae.model else self.lock
        with self.icae.inference(), weights:
            if long_context:
                with _lm_infinite().enabled(decoder, local_window=window):
                    yield decoder
            else:
                yield decoder

    @contextmanager
    def _adapters_off(self) -> Iterator[None]:
        """What peft's ``disable_adapter()`` does for LoRA, without its per-call walk over the
        model and status checks (a stream enters this once per token)."""
        layers = self._tuner_layers()
        for module in layers:
            module.enable_adapters(False)
        try:
            yield
        finally:
            for module in layers:
                module.enable_adapters(True)
            self.icae.restore_trainable()  # disabling froze every adapter

    def _activate(self, adapter: str) -> None:
        for module in self._tuner_layers():
            module.set_adapter(adapter)
        self.icae.restore_trainable()

    def _tuner_layers(self) -> list[BaseTunerLayer]:
        """The PEFT model's LoRA layers, found once (the model's structure never changes)."""
        if self._tuner_layer_cache is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._tuner_layer_cache = [
                m for m in self.icae.model.modules() if isinstance(m, BaseTunerLayer)
            ]
        return self._tuner_layer_cache

    def adapters_enabled(self) -> bool:
        """Whether every LoRA layer of the PEFT model has its adapters switched on."""
        return not any(layer.disable_adapters for layer in self._tuner_layers())

    # ----------------------------------------------------------------- decoding

    def generate_ids(
        self,
        prefix: torch.Tensor,
        max_new_tokens: int,
        sampling: Sampling,
        *,
        stream: bool,
        positions: list[int] | None = None,
        memory: bool = True,
        stop_ids: frozenset[int] | None = None,
    ) -> TokenStream:
        """Sampled token ids after a prefix of ``(n, d)`` input embeddings.

        ``positions`` (from ``ICAE.decoder_positions``) places the prefix; each new token then
        takes the next position. LM-Infinite needs consecutive positions, so a decode that
        outgrows the model's window reads a spread prefix in reading order (the caller warns).

        A non-streamed answer enters the decoder state once; a stream enters it around each
        forward call instead, never across a yield, so a paused stream cannot change what an
        interleaved ``compress`` or another thread sees.
        """
        icae = self.icae
        limit = icae.max_positions
        long_context = limit is not None and prefix.shape[0] + max_new_tokens > limit
        if long_context:
            positions = None
        sequence = _Sequence(self, long_context, memory, prefix.device)
        whole = nullcontext() if stream else self.state(long_context, memory)

        def run(tokens: TokenStream) -> Iterator[int]:
            with whole:
                inner = sample_tokens(
                    sequence.read_prefix(prefix, positions, per_call=stream),
                    lambda token: sequence.read_token(token, per_call=stream),
                    max_new_tokens=max_new_tokens,
                    sampling=sampling,
                    stop_ids=icae.stop_ids if stop_ids is None else stop_ids,
                )
                yield from inner
                tokens.finish_reason = inner.finish_reason

        return TokenStream(run)

    def text(self, tokens: TokenStream) -> TextStream:
        """Text pieces of ``tokens`` as they come."""
        return TextStream(self.icae.tokenizer, tokens)


class _Sequence:
    """One sequence's decoder cache and positions: the prefix, then a token at a time."""

    def __init__(
        self, decoder: Decoder, long_context: bool, memory: bool, device: torch.device
    ) -> None:
        self.decoder, self.long_context, self.memory = decoder, long_context, memory
        self.device = device
        self.cache: Any = None
        self.next_position: int | None = None  # set when the prefix has explicit positions
        self.length = 0

    def _state(self, per_call: bool) -> Any:
        if per_call:
            return self.decoder.state(self.long_context, self.memory)
        return nullcontext(self.decoder.step_module(self.memory, self.long_context))

    def read_prefix(
        self, prefix: torch.Tensor, positions: list[int] | None, per_call: bool
    ) -> torch.Tensor:
        placed: dict[str, torch.Tensor] = {}
        if positions is not None:
            # Custom positions need an explicit mask (see ``ICAE.encode``).
            placed["position_ids"] = torch.tensor([positions], device=self.device)
            placed["attention_mask"] = torch.ones(
                1, len(positions), dtype=torch.long, device=self.device
            )
            self.next_position = positions[-1] + 1
        with self._state(per_call) as model:
            self.cache = self.decoder.new_cache(model, self.long_context)
            out = model(
                inputs_embeds=prefix[None].to(input_dtype(model)),
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
                **placed,
            )
        self.cache = out.cache
        self.length = prefix.shape[0]
        return out.logits[0, -1]

    def read_token(self, token: int, per_call: bool) -> torch.Tensor:
        placed: dict[str, torch.Tensor] = {}
        self.length += 1
        if self.next_position is not None:
            placed["position_ids"] = torch.tensor([[self.next_position]], device=self.device)
            placed["attention_mask"] = torch.ones(
                1, self.length, dtype=torch.long, device=self.device
            )
            self.next_position += 1
        with self._state(per_call) as model:
            out = model(
                input_ids=torch.tensor([[token]], device=self.device),
                cache=self.cache,
                use_cache=True,
                **placed,
            )
        self.cache = out.cache
        return out.logits[0, -1]


def input_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a decoding module takes input embeddings in (its embedding table's)."""
    embeddings: Any = cast(Any, module).get_input_embeddings()  # a transformers model
    return embeddings.weight.dtype


def _lm_infinite() -> Any:
    from icmem import lm_infinite

    return lm_infinite
