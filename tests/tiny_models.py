"""Tiny random models and a byte-level BPE tokenizer, built in the test process.

They exercise the same code paths as the real SmolLM2 (Llama family, grouped-query attention,
byte-level BPE with a chat template) in milliseconds and without any download.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. A memory keeps what matters and forgets "
    "the rest. Paris is the capital of France; Berlin is the capital of Germany. "
    "0123456789 numbers, names and places: Alice, Bob, London, Tokyo.\n"
)


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (lossless on any UTF-8 text) with SmolLM2's special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TRAINING_TEXT] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(
    arch: str = "llama",
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 64,
    rope_theta: float = 10000.0,
) -> PretrainedConfig:
    """A Llama-family config small enough to run in milliseconds; kv_heads < heads gives GQA."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rope_theta=rope_theta,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    return config_cls(**common)


def tiny_model(arch: str = "llama", *, seed: int = 0, **config_kwargs) -> torch.nn.Module:
    """A randomly initialised causal LM in fp32 and eval mode, reproducible from `seed`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kwargs))
    return model.float().eval()


TINY_ICAE_CONFIG = dict(
    num_memory_tokens=8,
    span_tokens=32,
    min_memory_tokens=2,
    lora_rank=4,
    lora_alpha=8,
    lora_dropout=0.0,
)
TINY_ICAE_MAX_POSITIONS = 256


def tiny_icae_base(seed: int = 0) -> torch.nn.Module:
    """The tiny Llama (GQA) the test ICAEs are built on; equal seeds give equal weights."""
    return tiny_model(
        "llama", heads=4, kv_heads=2, max_positions=TINY_ICAE_MAX_POSITIONS, seed=seed
    )


def tiny_icae(tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, **overrides):
    """An untrained ICAE on a tiny Llama: 32-token spans into at most 8 slots."""
    from icmem.icae import ICAE

    config = {**TINY_ICAE_CONFIG, **overrides}
    return ICAE.from_base((tiny_icae_base(seed), tokenizer), **config).eval()


def tiny_embedder(tokenizer: PreTrainedTokenizerFast, *, seed: int = 0):
    """A one-layer random BERT behind the real TextEmbedder (32 dimensions)."""
    from transformers import BertConfig, BertModel

    from icmem.embedding import TextEmbedder

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return TextEmbedder(BertModel(config), tokenizer)


def randomise_trained_tensors(icae, seed: int = 1) -> None:
    """Give LoRA B (zero at init) and the new embeddings random values, as training would, so
    that tests can tell an adapter that is on from one that is off."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in icae.trainable_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


@dataclass(frozen=True)
class TinyIngestModels:
    """The tiny ICAE and embedder as an `icmem.distributed.ModelLoader` (tests/ must be on a Ray
    worker's PYTHONPATH); the tokenizer travels with it."""

    tokenizer: PreTrainedTokenizerFast
    seed: int = 0

    def load(self):
        # One tokenizer shared by both, as test_chunking checks is safe.
        embedder = tiny_embedder(self.tokenizer, seed=self.seed)
        return tiny_icae(self.tokenizer, seed=self.seed), embedder

    def embedding_dim(self) -> int:
        return 32
