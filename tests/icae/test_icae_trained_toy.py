"""A trained toy: a few hundred CPU steps of the autoencoding loss teach a tiny ICAE to
reconstruct held-out random spans, which an untrained adapter cannot. This proves the gradient
path end to end (encoder LoRA, memory and special embeddings, frozen decoder)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model

from icmem.icae import ICAE, ICAEExample

SPAN = 8  # tokens per span, and memory slots per span (k = 8)
ALPHABET = torch.arange(10, 26)  # a 16-token vocabulary for the random spans
SEPARATOR = 5


@pytest.fixture
def one_thread():
    """These matrices are tiny: on a shared 2-core machine, thread hand-offs cost more than the
    arithmetic (a step takes ~20 ms on one thread, ~1 s on two contended ones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_spans(count: int, generator: torch.Generator) -> torch.Tensor:
    return ALPHABET[torch.randint(0, len(ALPHABET), (count, SPAN), generator=generator)]


def copying_model(generator: torch.Generator, steps: int = 150) -> torch.nn.Module:
    """A tiny LM trained to repeat its input (``x SEP x``): the ICAE assumes a decoder that can
    read its context, as a pretrained LLM can and a random network cannot."""
    model = tiny_model("llama", hidden_size=64, layers=2, vocab_size=32, max_positions=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        spans = random_spans(32, generator)
        sequence = torch.cat([spans, torch.full((32, 1), SEPARATOR), spans], dim=1)
        labels = sequence.masked_fill(torch.arange(sequence.shape[1]) <= SPAN, -100)
        loss = model(input_ids=sequence, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def reconstruction_accuracy(icae: ICAE, spans: list[list[int]]) -> float:
    """Fraction of tokens that greedy ``[AE]`` decoding puts back in the right place."""
    right = 0
    for memory, span in zip(icae.compress(spans), spans, strict=True):
        decoded = icae.tokenize(icae.reconstruct([memory]))
        right += sum(a == b for a, b in zip(decoded, span, strict=False))
    return right / (len(spans) * SPAN)


def autoencoding_loss(icae: ICAE, spans: list[list[int]], shift: int = 0) -> float:
    """Held-out ``[AE]`` loss; with ``shift`` each target is scored against another span's
    memory, which shows whether the decoder really reads the slots."""
    examples = [
        ICAEExample(spans[(i + shift) % len(spans)], "ae", span) for i, span in enumerate(spans)
    ]
    with torch.no_grad():
        return float(icae.training_loss(examples))


def test_autoencoding_training_learns_to_reconstruct_held_out_spans(tokenizer, one_thread):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = copying_model(generator)
    config = dict(
        num_memory_tokens=SPAN,
        span_tokens=SPAN,
        min_memory_tokens=1,
        lora_rank=8,
        lora_alpha=16,
        lora_dropout=0.0,
    )
    untrained = ICAE.from_base((copy.deepcopy(base), tokenizer), **config).eval()
    icae = ICAE.from_base((base, tokenizer), **config)
    optimizer = torch.optim.AdamW(icae.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    icae.train()
    for _ in range(250):
        batch = random_spans(16, generator).tolist()
        loss = icae.training_loss([ICAEExample(span, "ae", []) for span in batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    icae.eval()

    held_out = random_spans(24, torch.Generator().manual_seed(123)).tolist()
    trained_loss = autoencoding_loss(icae, held_out)
    assert trained_loss < 0.25 * autoencoding_loss(untrained, held_out)
    assert autoencoding_loss(icae, held_out, shift=1) > 4 * trained_loss  # memory matters
    assert reconstruction_accuracy(untrained, held_out) < 0.35
    assert reconstruction_accuracy(icae, held_out) > 0.75
