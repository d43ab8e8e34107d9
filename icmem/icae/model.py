"""The In-Context Autoencoder (Ge et al., ICLR 2024) around one causal LM.

Encoder: the LM with a LoRA adapter reads ``[span tokens][k memory tokens]``; under causal
attention the memory tokens see the whole span, and the hidden states at their positions (the
last layer's normed output, or a chosen layer's residual stream, optionally through a small
learned head) are the span's memory slots.

Decoder: the same LM with the adapter switched off and every weight frozen reads
``[slots of span 1]..[slots of span n][special][prompt]`` as input embeddings. The special
embeddings ``[AE]`` (reconstruct), ``[LM]`` (continue) and ``[FT]`` (answer an instruction) and
the memory-token embeddings are separate parameters rather than new vocabulary, so the base
model and its tokenizer stay untouched and every trained tensor lives in the checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from torch import nn
from torch.profiler import record_function

from icmem.chunking import Span, chunk
from icmem.icae.batch_decode import stop_token_ids
from icmem.icae.config import ICAEConfig
from icmem.icae.decoder import (
    DECODER_ADAPTER,
    ENCODER_ADAPTER,
    Decoder,
    Sampling,
    TextStream,
)
from icmem.icae.errors import BaseModelMismatchError, ICAEConfigError
from icmem.icae.slots import MemorySlots
from icmem.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from typing import TypeAlias

    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    ModelSource: TypeAlias = (
        "str | os.PathLike[str] | tuple[PreTrainedModel, PreTrainedTokenizerBase]"
    )

Task = Literal["ae", "lm", "ft"]
EncoderPath = Literal["reference", "compiled"]
Prompt = str | Sequence[Mapping[str, str]]  # plain text, or a conversation of role/content
ENCODER_PATHS: tuple[EncoderPath, ...] = ("reference", "compiled")
_IGNORE = -100


@dataclass(frozen=True)
class TeacherTargets:
    """What a teacher predicted at each target token of an example: its ``k`` most likely
    next tokens and their log-probabilities (over the full vocabulary, temperature 1), one row
    per target token plus one for the end-of-sequence token that ``training_loss`` appends.

    Top-k rows in float16 keep a cache of thousands of examples small; ``k`` equal to the
    vocabulary size keeps the whole distribution."""

    token_ids: torch.Tensor  # (T + 1, k) int64
    logprobs: torch.Tensor  # (T + 1, k) float16 or float32

    def __post_init__(self) -> None:
        if self.token_ids.ndim != 2 or self.token_ids.shape != self.logprobs.shape:
            raise ICAEConfigError(
                f"teacher token_ids {tuple(self.token_ids.shape)} and logprobs "
                f"{tuple(self.logprobs.shape)} must both be (target tokens + 1, k)"
            )


@dataclass(frozen=True)
class ICAEExample:
    """One training example. The decoder reads ``[slots(context)][task][prompt][target]``.

    ``ae``: the target is the context itself (an empty ``target_ids`` means exactly that).
    ``lm``: the target is the text that follows the context. ``ft``: ``prompt_ids`` is the
    instruction laid out by ``ICAE.format_prompt`` and the target is the answer; the loss is on
    the target only, in every task.

    Distillation adds three things. ``span_lengths`` cuts the context into the spans that
    recall would return (several documents' spans in memory order) instead of consecutive
    ``span_tokens`` pieces. ``slots`` holds those spans' slots when a frozen encoder has
    computed them already (a cache), so the encoder does not run. ``teacher`` makes the loss
    the KL divergence from the teacher's distributions; ``gold`` adds cross-entropy on the
    target (true where the target is a known right answer or the real text).
    """

    context_ids: list[int]
    task: Task
    target_ids: list[int]
    prompt_ids: list[int] = field(default_factory=list)
    span_lengths: tuple[int, ...] = ()
    slots: tuple[torch.Tensor, ...] = ()
    teacher: TeacherTargets | None = None
    gold: bool = True

    def __post_init__(self) -> None:
        if not self.context_ids:
            raise ICAEConfigError("an ICAEExample needs a non-empty context_ids to compress")
        if not self.target_ids and self.task != "ae":
            raise ICAEConfigError(
                f"a {self.task!r} example needs target_ids; only 'ae' may leave them empty "
                "(meaning: reconstruct the context)"
            )
        if self.prompt_ids and self.task != "ft":
            raise ICAEConfigError(
                f"prompt_ids are only read by 'ft' examples, not {self.task!r}; "
                "put the text in target_ids or use task='ft'"
            )
        if self.span_lengths and (
            sum(self.span_lengths) != len(self.context_ids) or min(self.span_lengths) < 1
        ):
            raise ICAEConfigError(
                f"span_lengths {self.span_lengths} must be positive and add up to the "
                f"{len(self.context_ids)} context tokens"
            )
        if self.slots and len(self.slots) != len(self.span_lengths or [0]):
            raise ICAEConfigError(
                f"{len(self.slots)} cached slot tensors for {len(self.span_lengths)} spans; "
                "give span_lengths and one tensor per span"
            )
        target = len(self.target_ids or self.context_ids)
        if self.teacher is not None and self.teacher.token_ids.shape[0] not in (target, target + 1):
            raise ICAEConfigError(
                f"the teacher has {self.teacher.token_ids.shape[0]} rows for {target} target "
                "tokens; give one per target token plus one for the end-of-sequence token"
            )
        if self.teacher is None and not self.gold:
            raise ICAEConfigError("an example with gold=False needs a teacher to learn from")


@dataclass(frozen=True)
class DistillLoss:
    """How ``training_loss`` weighs teacher and gold: KL at ``temperature`` (scaled by its
    square, so gradients keep their size) plus ``gold_weight`` times the cross-entropy."""

    temperature: float = 1.0
    gold_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.gold_weight < 0:
            raise ICAEConfigError(
                f"temperature={self.temperature}, gold_weight={self.gold_weight}; use a "
                "positive temperature and a weight of 0 or more"
            )


class ICAE(nn.Module):
    """An In-Context Autoencoder over one base causal LM.

    Build an untrained one with ``from_base`` and a trained one with ``from_pretrained``. The
    base model passed in is wrapped in place (LoRA layers are injected into it) and frozen.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: ICAEConfig,
        fingerprint: str,
    ) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.config = config
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        model.requires_grad_(False)
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(model, lora)
        if config.decoder_lora_rank:
            self.model.add_adapter(
                DECODER_ADAPTER,
                LoraConfig(
                    r=config.decoder_lora_rank,
                    lora_alpha=2 * config.decoder_lora_rank,
                    lora_dropout=config.lora_dropout,
                    target_modules=list(config.lora_targets),
                    bias="none",
                    task_type="CAUSAL_LM",
                ),
            )
        # Both adapters train together; switching the active one must not freeze the other.
        self._lora_parameters = [p for n, p in self.model.named_parameters() if "lora_" in n]
        for param in self._lora_parameters:
            param.requires_grad_(True)
        embedding = model.get_input_embeddings()
        assert isinstance(embedding.weight, torch.Tensor)  # an nn.Embedding in transformers
        table = embedding.weight.detach().float()  # (V, d)
        self.hidden_size = table.shape[1]
        # New embeddings start as draws from the per-dimension mean and spread of the real token
        # embeddings: the frozen layers then see inputs at the scale they were trained on (zeros
        # or unit Gaussians are far off it), and random draws keep the k memory tokens distinct
        # so each slot can specialise. A fixed seed makes from_base reproducible.
        generator = torch.Generator().manual_seed(0)
        mean, std = table.mean(0), table.std(0)

        def draw(rows: int) -> nn.Parameter:
            noise = torch.randn(rows, self.hidden_size, generator=generator)
            return nn.Parameter((mean + std * noise).to(table.device))

        self.memory_embeddings = draw(config.num_memory_tokens)  # (k, d)
        self.special_embeddings = draw(len(config.special_tokens))  # (n_special, d)
        self.slot_gain: nn.Parameter | None = None
        self.slot_proj: nn.Linear | None = None
        if config.slot_head != "none":
            # Decoder inputs should look like token embeddings: start the gain at their RMS.
            token_rms = float(table.pow(2).mean().sqrt())
            if config.slot_residual == "pooled":
                token_rms /= 4  # the pooled token embeddings carry the first steps
            self.slot_gain = nn.Parameter(torch.full((self.hidden_size,), token_rms))
        if config.slot_head == "affine":
            self.slot_proj = nn.Linear(self.hidden_size, self.hidden_size)
            with torch.no_grad():
                self.slot_proj.weight.copy_(torch.eye(self.hidden_size))
                self.slot_proj.bias.zero_()
        self._early_exit = _EarlyExit(self.model.get_base_model(), config.slot_layer)
        # The inference encoder (see _encoder_body), in a list so that it is not registered as
        # a submodule: it is derived state, never saved, moved or trained.
        self._merged: list[nn.Module] = []
        self._merged_key: tuple[Any, ...] = ()
        self._encoder_path: EncoderPath = "reference"
        self._merged_lock = threading.Lock()
        self.decoder = Decoder(self)  # decoding, adapter switching and their lock
        self.stop_ids = _stop_token_ids(model, tokenizer)
        self.encoder_frozen = False  # see freeze_encoder
        self._frozen_parameters: list[nn.Parameter] = []

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_base(cls, source: ModelSource = DEFAULT_MODEL, **config: Any) -> ICAE:
        """An untrained ICAE on ``source``: any name or path ``icmem.load_model`` accepts, or an
        already loaded ``(model, tokenizer)`` pair (whose ``base_model`` name defaults to the
        model's ``name_or_path``). Keyword arguments override ``ICAEConfig`` fields."""
        from icmem.icae.checkpoint import load_base_model

        if isinstance(source, tuple):
            name = config.pop("base_model", None) or source[0].config.name_or_path or "custom"
            icae_config = ICAEConfig(base_model=str(name), **config)
        else:
            icae_config = ICAEConfig(base_model=str(source), **config)
        model, tokenizer, fingerprint = load_base_model(
            source, icae_config.base_revision, icae_config.dtype
        )
        return cls(model, tokenizer, icae_config, fingerprint)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str] | None = None,
        base_model: ModelSource | None = None,
        *,
        dtype: str | None = None,
    ) -> ICAE:
        """Load a checkpoint written by ``save_pretrained``; with no directory, the shipped
        default. ``base_model`` overrides the base named in the checkpoint (it must have the
        same fingerprint); ``dtype`` overrides the one it was trained in (e.g. "bfloat16" for
        faster CPU inference)."""
        from icmem.icae.checkpoint import load_checkpoint

        return load_checkpoint(cls, directory, base_model, dtype)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write only the trained tensors (LoRA, memory and special embeddings) and config."""
        from icmem.icae.checkpoint import save_checkpoint

        return save_checkpoint(self, directory)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA weights plus memory and special embeddings; the base model stays frozen."""
        return [p for p in self.parameters() if p.requires_grad]

    def freeze_encoder(self) -> None:
        """Train the decoder side only (its adapter and the task embeddings): the slots of a
        span then never change, so they can be computed once and cached, and a training step
        runs no encoder at all (Badger, arXiv 2602.13466: let the decoder learn to read
        memories first)."""
        marker = f".{DECODER_ADAPTER}."
        encoder = [p for n, p in self.model.named_parameters() if "lora_" in n and marker not in n]
        frozen = {id(p) for p in encoder}
        self._lora_parameters = [p for p in self._lora_parameters if id(p) not in frozen]
        self._frozen_parameters = encoder
        for param in encoder:
            param.requires_grad_(False)
        for name, tensor in self.own_tensors().items():
            if name != "special_embeddings":
                tensor.requires_grad_(False)
        self.encoder_frozen = True

    def encoder_digest(self) -> str:
        """A short id of everything that shapes the slots (the encoder's adapter, the memory
        embeddings, the slot head), equal for fp32 and bf16 copies: a cache of slots is valid
        only for the encoder that wrote it."""
        digest = hashlib.sha256()
        marker = f".{DECODER_ADAPTER}."
        encoder = [
            (n, p) for n, p in self.model.named_parameters() if "lora_" in n and marker not in n
        ]
        own = [(n, t) for n, t in self.own_tensors().items() if n != "special_embeddings"]
        with torch.no_grad():
            for name, tensor in sorted(encoder + own, key=lambda item: item[0]):
                digest.update(name.encode())
                bits = tensor.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy()
                digest.update(bits.tobytes())
        return digest.hexdigest()[:16]

    def own_tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors outside the LoRA adapter, by the name checkpoints store them."""
        tensors: dict[str, torch.Tensor] = {
            "memory_embeddings": self.memory_embeddings,
            "special_embeddings": self.special_embeddings,
        }
        if self.slot_gain is not None:
            tensors["slot_gain"] = self.slot_gain
        if self.slot_proj is not None:
            tensors["slot_proj.weight"] = self.slot_proj.weight
            tensors["slot_proj.bias"] = self.slot_proj.bias
        return tensors

    # ----------------------------------------------------------------- properties

    @property
    def device(self) -> torch.device:
        return self.memory_embeddings.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def vocab_size(self) -> int:
        """Rows of the decoder's logits (the output embeddings, padding rows included)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    # ----------------------------------------------------------------- encoder

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        num_slots: int | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Compress a padded batch of spans into memory slots, differentiably.

        ``input_ids`` and ``attention_mask`` are ``(B, T)`` with left or right padding (or any
        mask; the real tokens of a row are taken in order). Each row is repacked as
        ``[its tokens][memory tokens][padding]`` so that positions start where a lone span's
        would and padding only ever follows what it could leak into. ``num_slots`` is one count
        for every row (default k) or one per row. Returns ``(B, m, d)`` with ``m`` the largest
        count; a row with fewer slots is zero past its count. A span gets the same slots alone
        or in any batch: each row sees only its own tokens, its own memory tokens, and the
        positions ``config.slot_positions_for`` gives its length and count.
        """
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ICAEConfigError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask "
                f"{tuple(attention_mask.shape)} must both be (B, T)"
            )
        batch = input_ids.shape[0]
        k = self.config.num_memory_tokens
        if num_slots is None or isinstance(num_slots, int):
            counts = [k if num_slots is None else num_slots] * batch
        else:
            counts = [int(c) for c in num_slots]
        if len(counts) != batch or not all(1 <= c <= k for c in counts):
            raise ICAEConfigError(
                f"num_slots={num_slots}; use 1..{k} (k), one count or one per row of the batch"
            )
        keep = attention_mask.bool()
        lengths = keep.sum(1).tolist()  # (B,)
        if min(lengths) < 1:
            raise ICAEConfigError("a row of the batch has no tokens; drop empty spans first")
        if max(lengths) > self.config.span_tokens:
            raise ICAEConfigError(
                f"a span has {max(lengths)} tokens, more than span_tokens="
                f"{self.config.span_tokens}; split it with ICAE.split_spans"
            )
        with record_function("icae.pack"):
            embeds, mask, position_ids, token_embeds = self._pack(input_ids, keep, lengths, counts)
        training = torch.is_grad_enabled()
        with (
            self.decoder.lock if training else nullcontext(),
            record_function("icae.encoder_forward"),
        ):
            hidden = self._early_exit.run(
                self._encoder_body(),
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=False,
            )  # (B, n + m max, d)
        with record_function("icae.slot_head"):
            return self._read_slots(hidden, token_embeds, keep, lengths, counts)

    def _pack(
        self, input_ids: torch.Tensor, keep: torch.Tensor, lengths: list[int], counts: list[int]
    ) -> tuple[torch.Tensor, ...]:
        """Embed and repack rows as ``[tokens][memory tokens][padding]`` (see ``encode``).
        Returns the packed embeddings, their mask and positions, and the token embeddings."""
        token_embeds = self._embed(input_ids.to(self.device))  # (B, T, d)
        memory = self.memory_embeddings.to(self.dtype)  # (k, d)
        width = max(n + m for n, m in zip(lengths, counts, strict=True))
        first = 1 if self.config.slot_positions == "spread" else 0
        rows, positions = [], []
        for row_embeds, row_keep, n, m in zip(token_embeds, keep, lengths, counts, strict=True):
            pad = row_embeds.new_zeros(width - n - m, self.hidden_size)
            rows.append(torch.cat([row_embeds[row_keep.to(self.device)], memory[:m], pad]))
            slot_at = self.config.slot_positions_for(n, m)
            positions.append(list(range(first, first + n)) + slot_at + [0] * (width - n - m))
        embeds = torch.stack(rows)  # (B, n + m max, d)
        # An explicit mask always: without one, transformers reads non-monotonic positions as
        # packed sequences and blocks attention between the "packs". It is all ones: padding
        # only follows a row's real positions, which causal attention never lets them see, so
        # masking it changes nothing that is read, while an all-ones mask lets SDPA run its
        # causal kernel (no 4D mask built, blocks above the diagonal skipped) on mixed lengths.
        mask = torch.ones(len(rows), width, dtype=torch.long, device=self.device)
        position_ids = torch.tensor(positions, device=self.device)
        return embeds, mask, position_ids, token_embeds

    def _read_slots(
        self,
        hidden: torch.Tensor,
        token_embeds: torch.Tensor,
        keep: torch.Tensor,
        lengths: list[int],
        counts: list[int],
    ) -> torch.Tensor:
        """``(B, m_max, d)`` slots from the encoder's states at each row's memory positions."""
        width = hidden.shape[1]
        m_max = max(counts)
        index = torch.tensor(lengths, device=self.device)[:, None] + torch.arange(
            m_max, device=self.device
        )
        index = index.clamp(max=width - 1)[:, :, None].expand(-1, -1, self.hidden_size)
        slots = self._slot_head(hidden.gather(1, index))  # (B, m_max, d)
        if self.config.slot_residual == "pooled":
            slots = slots + self._pooled(token_embeds, keep, lengths, m_max, counts)
        beyond = (
            torch.arange(m_max, device=self.device)[None, :]
            >= torch.tensor(counts, device=self.device)[:, None]
        )
        return slots.masked_fill(beyond[:, :, None], 0.0)

    def _pooled(
        self,
        token_embeds: torch.Tensor,
        keep: torch.Tensor,
        lengths: list[int],
        m_max: int,
        counts: list[int],
    ) -> torch.Tensor:
        """``(B, m_max, d)``: per slot, the mean embedding of its group of span tokens."""
        pooled = token_embeds.new_zeros(len(lengths), m_max, self.hidden_size)
        for row, (embeds, row_keep, n, m) in enumerate(
            zip(token_embeds, keep, lengths, counts, strict=True)
        ):
            weights = torch.zeros(m, n, dtype=embeds.dtype, device=self.device)
            for j, (first, end) in enumerate(self.config.slot_groups(n, m)):
                weights[j, first:end] = 1.0 / (end - first)
            pooled[row, :m] = weights @ embeds[row_keep.to(self.device)]
        return pooled

    def _encoder_body(self) -> nn.Module:
        """The transformer body that encodes.

        With gradients on (training) it is the PEFT model, adapter on, so gradients reach the
        LoRA weights. Without them it is a copy of the base model with the adapter merged into
        its weights: one plain forward instead of base plus LoRA matmuls, and no adapter state
        shared with the decoder, which switches the PEFT model's adapter off while it decodes
        (so compressing and decoding in two threads cannot disturb each other). The copy costs
        one more set of base weights in memory and is rebuilt whenever a trained tensor has
        changed since it was made (tensor version counters tell). On the ``"compiled"`` path
        (``set_encoder_path``) its decoder layers run through ``torch.compile``.
        """
        if torch.is_grad_enabled():
            return _backbone(self.model.get_base_model())
        trained = [p for p in self.model.parameters() if p.requires_grad]
        key = (self.device, self.dtype, self._encoder_path, *(p._version for p in trained))
        with self._merged_lock:
            if not self._merged or key != self._merged_key:
                self._merged.clear()  # free the stale copy before making the new one
                merged = self.merged_copy(ENCODER_ADAPTER)
                if self._encoder_path == "compiled":
                    _compile_layers(merged)
                self._merged.append(merged)
                self._merged_key = key
            return _backbone(self._merged[0])

    def set_encoder_path(self, path: EncoderPath) -> None:
        """Choose how compression runs: ``"reference"`` (eager PyTorch, the default) or
        ``"compiled"`` (the same merged encoder with its decoder layers compiled by
        ``torch.compile``: the norms, rotary and activation ops are fused, which is where an
        eager bf16 forward on CPU spends about half its time). The compiled path gives the
        reference path's slots within bf16 rounding (tested) but pays a compilation on its
        first batch (seconds for a toy model, minutes for SmolLM2 on two cores), so it suits
        ingesting a corpus, not compressing one span. Training is unaffected."""
        if path not in ENCODER_PATHS:
            raise ICAEConfigError(f"encoder path {path!r}; use one of {ENCODER_PATHS}")
        self._encoder_path = path

    def _slot_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Encoder states ``(B, m, d)`` to decoder input embeddings (see ``ICAEConfig``)."""
        if self.slot_gain is None:
            return hidden
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.slot_gain
        if self.slot_proj is not None:
            x = self.slot_proj(x)
        return x.to(self.dtype)

    def split_spans(self, token_ids: Sequence[int]) -> list[list[int]]:
        """Cut a document into consecutive spans of at most ``span_tokens`` tokens."""
        step = self.config.span_tokens
        return [list(token_ids[i : i + step]) for i in range(0, len(token_ids), step)]

    def compress(
        self,
        texts_or_token_ids: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        *,
        batch_size: int = 8,
    ) -> list[MemorySlots]:
        """Compress documents into one ``MemorySlots`` per span, in document then span order.

        Accepts a text, a list of texts, a list of token ids, or a list of such lists. Spans are
        batched longest first (less padding); a span's slots do not depend on its batch.
        """
        if batch_size < 1:
            raise ICAEConfigError(f"batch_size={batch_size}; use 1 or more")
        spans = [span for doc in self._documents(texts_or_token_ids) for span in doc]
        order = sorted(range(len(spans)), key=lambda i: -len(spans[i]))
        results: list[MemorySlots | None] = [None] * len(spans)
        with self.inference():
            for start in range(0, len(order), batch_size):
                chosen = order[start : start + batch_size]
                tensors = self._encode_spans([spans[i] for i in chosen])
                for i, tensor in zip(chosen, tensors, strict=True):
                    results[i] = MemorySlots(
                        tensor=tensor.detach().cpu(),
                        span_id=_span_id(spans[i]),
                        token_count=len(spans[i]),
                        fingerprint=self.fingerprint,
                    )
        return [slots for slots in results if slots is not None]

    def _encode_spans(self, spans: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Encode spans in one batch; each gets ``config.slots_for(len)`` slots."""
        counts = [self.config.slots_for(len(span)) for span in spans]
        width = max(len(span) for span in spans)
        ids = torch.zeros(len(spans), width, dtype=torch.long)
        mask = torch.zeros(len(spans), width, dtype=torch.long)
        for row, span in enumerate(spans):
            ids[row, : len(span)] = torch.tensor(span, dtype=torch.long)
            mask[row, : len(span)] = 1
        slots = self.encode(ids, mask, num_slots=counts)  # (B, m, d)
        return [row[:count] for row, count in zip(slots, counts, strict=True)]

    def _documents(self, source: Any) -> list[list[list[int]]]:
        """Normalise compress input to documents of spans of token ids."""
        if isinstance(source, str) or (source and isinstance(source[0], int)):
            source = [source]
        documents = []
        for index, doc in enumerate(source):
            if isinstance(doc, str):
                # The one span splitter: spans never end inside a character.
                spans = [list(span.token_ids) for span in self._chunk(doc)]
            else:
                spans = self.split_spans([int(t) for t in doc])
            if not spans:
                raise ICAEConfigError(f"document {index} has no tokens; drop empty texts first")
            documents.append(spans)
        if not documents:
            raise ICAEConfigError("nothing to compress: pass a text or token ids")
        return documents

    # ----------------------------------------------------------------- prompts

    def _chunk(self, text: str) -> list[Span]:
        return chunk(text, self.tokenizer, span_tokens=self.config.span_tokens)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of plain text, without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def format_prompt(self, text: str) -> list[int]:
        """Token ids of an instruction as the decoder reads it after ``[FT]``: a user turn
        plus the assistant header from the chat template when the model has one, else the text
        as is. Training and inference both lay prompts out here."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.format_chat([{"role": "user", "content": text}])
        return self.tokenize(text)

    def format_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a whole conversation (``role``/``content`` dicts: system, user,
        assistant, ...) laid out with the chat template, ending with the assistant's header."""
        return self.tokenize(self.chat_text(messages))

    def chat_text(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The text of a conversation laid out with the chat template, ending with the
        assistant's header. Without a template each turn is a ``role: content`` line."""
        if not messages:
            raise ICAEConfigError("a conversation needs at least one message")
        for index, message in enumerate(messages):
            if not isinstance(message.get("role"), str) or not isinstance(
                message.get("content"), str
            ):
                raise ICAEConfigError(
                    f"message {index} is {message!r}; give each message a 'role' and a "
                    "'content' string"
                )
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            laid_out = self.tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=True
            )
            assert isinstance(laid_out, str)  # one conversation, tokenize=False: its text
            return laid_out
        return "".join(f"{m['role']}: {m['content']}\n" for m in turns) + "assistant:"

    def _special(self, task: str) -> torch.Tensor:
        """The ``(1, d)`` embedding of a task's special token."""
        if task not in self.config.special_tokens:
            raise ICAEConfigError(
                f"unknown task {task!r}; this ICAE knows {list(self.config.special_tokens)}"
            )
        index = self.config.special_tokens.index(task)
        return self.special_embeddings[index : index + 1].to(self.dtype)

    def _causal_lm(self) -> PreTrainedModel:
        """The transformers model inside the PEFT wrapper (peft types it as a plain Module)."""
        from transformers import PreTrainedModel

        base = self.model.get_base_model()
        assert isinstance(base, PreTrainedModel)  # __init__ wraps one
        return base

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        """``(n, d)`` embeddings of a list of token ids (``(0, d)`` for an empty list)."""
        return self._embed(torch.tensor(list(ids), dtype=torch.long, device=self.device))

    # ----------------------------------------------------------------- training

    def training_loss(
        self, examples: Sequence[ICAEExample], distill: DistillLoss | None = None
    ) -> torch.Tensor:
        """Mean loss per target token over the batch (teacher forcing): cross-entropy, or for
        examples with a ``teacher`` the KL divergence from it (plus cross-entropy where
        ``gold``, weighted by ``distill``).

        Contexts are split into spans (``span_lengths``, else consecutive ``span_tokens``
        pieces) and compressed independently, slots concatenated in order; cached ``slots``
        skip the encoder. Every target ends with the tokenizer's EOS (added when missing) so
        the decoder learns where to stop.
        """
        if not examples:
            raise ICAEConfigError("training_loss needs at least one example")
        distill = distill or DistillLoss()
        memories = self._example_memories(examples)
        rows, labels, positions, counts = [], [], [], []
        for example, mine in zip(examples, memories, strict=True):
            memory = torch.cat([s for s, _ in mine])
            target = self.with_eos(example.target_ids or example.context_ids)
            counts.append(len(target))
            prefix = torch.cat(
                [memory, self._special(example.task), self.embed_ids(example.prompt_ids)]
            )
            rows.append(torch.cat([prefix, self.embed_ids(target)]))
            labels.append([_IGNORE] * prefix.shape[0] + target)
            positions.append(
                self.decoder_positions(
                    [(length, s.shape[0]) for s, length in mine],
                    example.task,
                    len(example.prompt_ids) + len(target),
                )
            )
        width = max(row.shape[0] for row in rows)
        embeds = torch.stack(
            [torch.cat([r, r.new_zeros(width - r.shape[0], self.hidden_size)]) for r in rows]
        )  # (B, L, d)
        mask = torch.tensor([[1] * r.shape[0] + [0] * (width - r.shape[0]) for r in rows])
        label_ids = torch.tensor([lab + [_IGNORE] * (width - len(lab)) for lab in labels])
        extra = {}
        # decoder_positions gives every example a list, or (reading order) none of them one.
        spread = [pos for pos in positions if pos is not None]
        if spread:
            extra["position_ids"] = torch.tensor(
                [pos + [0] * (width - len(pos)) for pos in spread], device=self.device
            )
        with self.decoder.weights():
            base = self._causal_lm()
            hidden = _backbone(base)(
                inputs_embeds=embeds,
                attention_mask=mask.to(self.device),
                use_cache=False,
                **extra,
            ).last_hidden_state  # (B, L, d)
        # Position t predicts token t + 1; the vocabulary head runs on target positions only.
        targets = label_ids[:, 1:].to(self.device)  # (B, L - 1)
        chosen = targets != _IGNORE
        logits = base.get_output_embeddings()(hidden[:, :-1][chosen]).float()  # (N, V)
        return _token_losses(logits, targets[chosen], examples, counts, distill).mean()

    def _example_memories(
        self, examples: Sequence[ICAEExample]
    ) -> list[list[tuple[torch.Tensor, int]]]:
        """Per example, ``(slots, token count)`` of each span of its memory: cached slots as
        given, the rest encoded in one batch."""
        owners, spans = [], []
        for index, example in enumerate(examples):
            if example.slots:
                continue
            for span in self.example_spans(example):
                owners.append(index)
                spans.append(span)
        if self.encoder_frozen:
            # A frozen encoder's slots are constants: give the decoder what the store would
            # (bf16, as the codec keeps them), exactly what a cache of them holds.
            with torch.no_grad():
                fresh = self._encode_spans(spans) if spans else []
            encoded = iter([t.to(torch.bfloat16) for t in fresh])
        else:
            encoded = iter(self._encode_spans(spans) if spans else [])
        memories: list[list[tuple[torch.Tensor, int]]] = []
        for index, example in enumerate(examples):
            lengths = [len(span) for span in self.example_spans(example)]
            if example.slots:
                tensors = [t.to(self.device, self.dtype) for t in example.slots]
            else:
                tensors = [next(encoded) for o in owners if o == index]
            memories.append(list(zip(tensors, lengths, strict=True)))
        return memories

    def example_spans(self, example: ICAEExample) -> list[list[int]]:
        """The spans an example's memory is made of (see ``ICAEExample.span_lengths``)."""
        if not example.span_lengths:
            return self.split_spans(example.context_ids)
        spans, start = [], 0
        for length in example.span_lengths:
            if length > self.config.span_tokens:
                raise ICAEConfigError(
                    f"a span of {length} tokens exceeds span_tokens={self.config.span_tokens}"
                )
            spans.append(list(example.context_ids[start : start + length]))
            start += length
        return spans

    def with_eos(self, ids: Sequence[int]) -> list[int]:
        """``ids`` ending with the tokenizer's end-of-sequence token (added when missing): how
        every training target ends, so the decoder learns where to stop."""
        ids = list(ids)
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids

    # ----------------------------------------------------------------- decoder

    @overload
    def generate(
        self,
        memory: Sequence[MemorySlots],
        prompt: Prompt,
        *,
        stream: Literal[False] = ...,
        **options: Any,
    ) -> str: ...

    @overload
    def generate(
        self,
        memory: Sequence[MemorySlots],
        prompt: Prompt,
        *,
        stream: Literal[True],
        **options: Any,
    ) -> Iterator[str]: ...

    def generate(
        self,
        memory: Sequence[MemorySlots],
        prompt: Prompt,
        *,
        max_new_tokens: int = 256,
        task: str = "ft",
        stream: bool = False,
        **sampling: Any,
    ) -> str | Iterator[str]:
        """Answer ``prompt`` from the concatenated slots of ``memory`` (in the order given).

        ``task="ft"`` lays the prompt out with the chat template: a question, or a whole
        conversation as ``role``/``content`` dicts (see ``format_chat``). With no memory at
        all, an ``"ft"`` prompt is answered by the base model alone, exactly as it would
        answer it without icmem. ``"lm"`` continues the memory with ``prompt`` as plain text;
        ``"ae"`` reconstructs it (prompt usually empty). ``sampling`` takes ``Sampling`` fields
        (greedy by default). With ``stream=True`` this returns an iterator of text pieces.
        """
        pieces = self.generate_text(
            memory, prompt, max_new_tokens=max_new_tokens, task=task, stream=stream, **sampling
        )
        return pieces if stream else "".join(pieces)

    def generate_text(
        self,
        memory: Sequence[MemorySlots],
        prompt: Prompt,
        *,
        max_new_tokens: int = 256,
        task: str = "ft",
        stream: bool = True,
        **sampling: Any,
    ) -> TextStream:
        """``generate`` as a stream of text pieces whose ``finish_reason`` tells, once it is
        exhausted, why the answer ended ("stop", "length" or "repetition"). ``stream=False``
        holds the decoder's state for the whole answer (cheaper when it is read at once)."""
        if max_new_tokens < 1:
            raise ICAEConfigError(f"max_new_tokens={max_new_tokens}; use 1 or more")
        settings = Sampling(**sampling)
        prompt_ids = self.prompt_ids(prompt, task)
        reads_memory = bool(memory) or task != "ft"
        with torch.no_grad():
            # With no memory at all, an "ft" prompt is answered by the base model alone.
            if reads_memory:
                embeds = self.decoder_inputs(memory, task, prompt_ids)  # (n, d)
            else:
                embeds = self.embed_ids(prompt_ids)
        positions = None
        if reads_memory:
            positions = self.decoder_positions(
                [(_known_token_count(s), s.num_slots) for s in memory]
                if self.config.slot_positions == "spread"
                else [],
                task,
                len(prompt_ids),
            )
        limit = self.max_positions
        if positions is not None and limit is not None and embeds.shape[0] + max_new_tokens > limit:
            warnings.warn(
                "memory + prompt + new tokens exceed the model's window, so LM-Infinite decodes "
                "and the spread slot positions are replaced by reading order; answers may be "
                "worse. Recall fewer spans or ask for fewer new tokens to keep the layout.",
                stacklevel=3,
            )
        tokens = self.decoder.generate_ids(
            embeds,
            max_new_tokens,
            settings,
            stream=stream,
            positions=positions,
            memory=reads_memory,
        )
        return self.decoder.text(tokens)

    def prompt_ids(self, prompt: Prompt, task: str = "ft") -> list[int]:
        """The token ids the decoder reads after the task token (see ``generate``)."""
        if not isinstance(prompt, str):
            if task != "ft":
                raise ICAEConfigError(
                    f"a conversation is answered with task='ft', not {task!r}; pass plain text "
                    "to continue or reconstruct"
                )
            return self.format_chat(prompt)
        return self.format_prompt(prompt) if task == "ft" else self.tokenize(prompt)

    @contextmanager
    def base_model(self) -> Iterator[nn.Module]:
        """The base model exactly as it answers without icmem (every adapter off, no gradients,
        eval mode): the teacher that distillation copies."""
        with self.decoder.state(False, memory=False, dtype=self.dtype) as model:
            yield model

    def reconstruct(
        self, memory: Sequence[MemorySlots], *, max_new_tokens: int | None = None
    ) -> str:
        """Decode the text the slots stand for (the ``[AE]`` task), greedily."""
        if max_new_tokens is None:
            counts = [s.token_count or self.config.span_tokens for s in memory]
            max_new_tokens = sum(counts) + 1  # + EOS
        return self.generate(memory, "", max_new_tokens=max_new_tokens, task="ae")

    def decoder_inputs(
        self, memory: Sequence[MemorySlots], task: str, prompt_ids: Sequence[int]
    ) -> torch.Tensor:
        """The decoder's ``(n, d)`` input embeddings ``[slots...][special][prompt]``."""
        if not memory:
            raise ICAEConfigError("generate needs at least one MemorySlots; compress text first")
        for slots in memory:
            if slots.fingerprint != self.fingerprint:
                raise BaseModelMismatchError(
                    f"memory slots of span {slots.span_id!r} come from base model "
                    f"{slots.fingerprint!r} but this ICAE runs {self.config.base_model!r} "
                    f"({self.fingerprint!r}); re-compress the text with this model"
                )
            if slots.hidden_size != self.hidden_size:
                raise ICAEConfigError(
                    f"memory slots have width {slots.hidden_size}, the model {self.hidden_size}"
                )
        parts = [s.tensor.to(self.device, self.dtype) for s in memory]
        parts += [self._special(task), self.embed_ids(prompt_ids)]
        return torch.cat(parts)

    def decoder_positions(
        self, spans: Sequence[tuple[int, int]], task: str, following: int
    ) -> list[int] | None:
        """Position ids of ``[slots...][special][following tokens]`` for the decoder, or None
        for reading order (``slot_positions="sequential"``).

        ``spans`` holds ``(token_count, num_slots)`` per span in memory order. Under
        ``"spread"`` span i covers the positions after the spans before it, its slots where the
        encoder put them; ``[AE]`` sits at 0 so the reconstruction walks the spans' own
        positions again, while any other task continues after the last span's text.
        """
        if self.config.slot_positions == "sequential":
            return None
        positions, offset = [], 0
        for token_count, num_slots in spans:
            relative = self.config.slot_positions_for(token_count, num_slots)
            positions += [offset + p for p in relative]
            offset += token_count
        start = 0 if task == "ae" else offset
        return positions + list(range(start, start + 1 + following))

    def decoder_logits(
        self, embeds: torch.Tensor, positions: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Next-token logits ``(B, L, V)`` of the frozen decoder (adapter off) on embeddings;
        ``positions`` (from ``decoder_positions``, shared by every row) places them."""
        placed: dict[str, torch.Tensor] = {}
        if positions is not None:
            placed["position_ids"] = torch.tensor([list(positions)], device=self.device)
            placed["attention_mask"] = torch.ones(
                embeds.shape[:2], dtype=torch.long, device=self.device
            )
        with self.decoder.weights():
            return self.model(inputs_embeds=embeds, use_cache=False, **placed).logits

    def merged_copy(self, adapter: str) -> nn.Module:
        """A copy of the base model with ``adapter`` merged into its own weights (one more set
        of base weights in memory), no LoRA wrappers, frozen, in eval mode.

        Copied between decoder forwards (under the decoder's lock): a decode in another thread
        may switch the PEFT model's adapters, and a copy made meanwhile would keep that state
        for good. The copy keeps the slot-layer hook pointing at this ICAE's early exit."""
        memo = {id(self._early_exit): self._early_exit}
        with torch.no_grad(), self.decoder.lock:
            peft_copy = copy.deepcopy(self.model, memo)
            merged = peft_copy.merge_and_unload(adapter_names=[adapter])
            merged.eval().requires_grad_(False)
        return merged

    def adapter_free_copy(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The base model without peft's LoRA wrappers, in eval mode: a copy of the PEFT
        model's structure that shares every parameter and buffer with it (no more weights in
        memory) and the slot-layer hook, its LoRA layers unloaded (``Decoder.model``). In
        another ``dtype`` than the model's it holds converted weights of its own instead."""
        shared: dict[int, Any] = {id(self._early_exit): self._early_exit}
        if dtype is None or dtype == self.dtype:
            for tensor in (*self.model.parameters(), *self.model.buffers()):
                shared[id(tensor)] = tensor
            return copy.deepcopy(self.model, shared).unload().eval()
        with torch.no_grad(), self.decoder.lock:
            return copy.deepcopy(self.model, shared).unload().to(dtype).eval()

    def restore_trainable(self) -> None:
        """peft's adapter switches set ``requires_grad`` by which adapter is active: put back
        what trains (both adapters, less a frozen encoder's)."""
        for param in self._lora_parameters:
            param.requires_grad_(True)
        for param in self._frozen_parameters:
            param.requires_grad_(False)

    @contextmanager
    def inference(self) -> Iterator[None]:
        """No gradients and eval mode (no LoRA dropout), restoring the training flag after."""
        was_training = self.training
        if was_training:
            self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            if was_training:
                self.train()


def _token_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    examples: Sequence[ICAEExample],
    counts: Sequence[int],
    distill: DistillLoss,
) -> torch.Tensor:
    """One loss per target token (``counts`` per example, in batch order): cross-entropy for
    plain examples; KL(teacher || student) at ``distill.temperature`` for examples with a
    teacher, plus ``gold_weight`` times cross-entropy where they are ``gold``.

    A top-k teacher is renormalised over its k tokens before the KL (the usual truncation:
    the mass outside the top k is dropped, not spread)."""
    ce = nn.functional.cross_entropy(logits, targets, reduction="none")  # (N,)
    if all(e.teacher is None for e in examples):
        return ce
    losses, start, t = [], 0, distill.temperature
    for example, count in zip(examples, counts, strict=True):
        mine = slice(start, start + count)
        start += count
        if example.teacher is None:
            losses.append(ce[mine])
            continue
        if example.teacher.token_ids.shape[0] != count:
            raise ICAEConfigError(
                f"the teacher has {example.teacher.token_ids.shape[0]} rows for {count} target "
                "tokens (EOS included); build the teacher on the same target"
            )
        student = torch.log_softmax(logits[mine] / t, dim=-1)  # (T, V)
        ids = example.teacher.token_ids.to(logits.device)
        teacher = torch.log_softmax(example.teacher.logprobs.to(logits.device).float() / t, -1)
        kl = (teacher.exp() * (teacher - student.gather(1, ids))).sum(-1) * (t * t)
        losses.append(kl + distill.gold_weight * ce[mine] if example.gold else kl)
    return torch.cat(losses)


def _lm_infinite() -> Any:
    from icmem import lm_infinite

    return lm_infinite


class _StopForward(Exception):
    """Raised by the slot-layer hook to end an encoder forward early."""


class _EarlyExit:
    """Runs the encoder only up to ``config.slot_layer`` and returns that layer's output.

    A forward hook on the chosen layer ends the forward by raising; it acts only inside
    ``run`` on the calling thread, so decoder forwards (and other threads) run every layer.
    """

    def __init__(self, causal_lm: nn.Module, layer: int | None) -> None:
        self.layer = layer
        self._local = threading.local()
        if layer is None:
            return
        layers = _decoder_layers(causal_lm)
        if layer >= len(layers):
            raise ICAEConfigError(
                f"slot_layer={layer}, but the base model has {len(layers)} layers; use 1.."
                f"{len(layers) - 1}, or None for the last layer's output"
            )
        layers[layer - 1].register_forward_hook(self._hook)

    def __getstate__(self) -> dict[str, Any]:
        # Thread-local state is per process; a copied or pickled model starts idle.
        return {"layer": self.layer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.layer = state["layer"]
        self._local = threading.local()

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if getattr(self._local, "active", False):
            self._local.captured = output[0] if isinstance(output, tuple) else output
            raise _StopForward

    def run(self, backbone: nn.Module, **inputs: Any) -> torch.Tensor:
        """``(B, T, d)`` hidden states: the slot layer's residual stream, or the last layer's
        normed output when no slot layer is set."""
        if self.layer is None:
            return backbone(**inputs).last_hidden_state
        self._local.active = True
        try:
            backbone(**inputs)
        except _StopForward:
            return self._local.captured
        finally:
            self._local.active = False
            captured = getattr(self._local, "captured", None)
            self._local.captured = None
            del captured
        raise ICAEConfigError(f"slot_layer={self.layer} was never reached by the encoder")


def _compile_layers(causal_lm: nn.Module) -> None:
    """Compile each decoder layer's forward in place (shapes dynamic, so new batch sizes and
    span lengths reuse the compiled code). Module hooks, such as the slot-layer exit, stay
    outside the compiled code and run as before."""
    for layer in _decoder_layers(causal_lm):
        layer.forward = torch.compile(layer.forward, dynamic=True)


def _decoder_layers(causal_lm: nn.Module) -> nn.ModuleList:
    layers = getattr(_backbone(causal_lm), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ICAEConfigError(
            "slot_layer needs a model whose body keeps its blocks in `.layers` (Llama, Mistral, "
            "Qwen2 and most decoder-only models); leave slot_layer None for this one"
        )
    return layers


def _backbone(causal_lm: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (hidden states without the vocabulary head)."""
    prefix = causal_lm.base_model_prefix
    assert isinstance(prefix, str)  # a transformers model's attribute naming its body
    return getattr(causal_lm, prefix)


def _known_token_count(slots: MemorySlots) -> int:
    if slots.token_count is None:
        raise ICAEConfigError(
            f"memory slots of span {slots.span_id!r} carry no token_count, which this ICAE's "
            "spread slot positions need; pass token_count= when rebuilding MemorySlots"
        )
    return slots.token_count


def _stop_token_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    """The generation config's stop ids (as ``generate`` reads them) and the tokenizer's eos."""
    eos = tokenizer.eos_token_id
    return stop_token_ids(model) | ({int(eos)} if eos is not None else set())


def _span_id(token_ids: Sequence[int]) -> str:
    """A content id: identical spans get identical ids, whatever document they came from."""
    digest = hashlib.sha256(",".join(map(str, token_ids)).encode())
    return digest.hexdigest()[:16]
