"""Greedy decoding gives exactly the tokens of a naive reference loop: every step recomputes the
whole sequence with no cache (LM-Infinite attention switched on for the whole forward when the
sequence outgrows the window), through the decoder's public logits. Tiny models and SmolLM2,
with memory (decoder adapter on, spread slot positions) and without, inside and past the window.

The references are computed here, each run, from the model itself: nothing is hard-coded, so a
faster decode step is held to the tokens the plain forward pass chooses."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext

import pytest
import torch
from tiny_models import TINY_ICAE_CONFIG

from icmem import lm_infinite
from icmem.icae import ICAE

Logits = Callable[[torch.Tensor, list[int] | None], torch.Tensor]  # (n, d), positions -> (V,)


def naive_greedy(
    icae: ICAE, prefix: torch.Tensor, positions: list[int] | None, steps: int, logits: Logits
) -> list[int]:
    """Greedy tokens by full recomputation: no cache, nothing clever."""
    table = icae.model.get_input_embeddings()
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            new = table(torch.tensor(tokens, dtype=torch.long))
            placed = None
            if positions is not None:
                placed = positions + list(range(positions[-1] + 1, positions[-1] + 1 + len(tokens)))
            token = int(logits(torch.cat([prefix, new]), placed).float().argmax())
            if token in icae.stop_ids:
                break
            tokens.append(token)
    return tokens


def memory_logits(icae: ICAE, long: bool) -> Logits:
    def run(embeds: torch.Tensor, positions: list[int] | None) -> torch.Tensor:
        infinite = lm_infinite.enabled(icae.model) if long else nullcontext()
        with infinite:
            return icae.decoder_logits(embeds[None], positions)[0, -1]

    return run


def plain_logits(icae: ICAE, long: bool) -> Logits:
    def run(embeds: torch.Tensor, positions: list[int] | None) -> torch.Tensor:
        with icae.base_model() as model:
            infinite = lm_infinite.enabled(model) if long else nullcontext()
            with infinite:
                return model(inputs_embeds=embeds[None]).logits[0, -1]

    return run


def memory_case(icae: ICAE, memory, prompt: str, steps: int) -> tuple[str, str]:
    """(generated text, the naive loop's text) from memory."""
    prompt_ids = icae.prompt_ids(prompt)
    with torch.no_grad():
        prefix = icae.decoder_inputs(memory, "ft", prompt_ids)
    long = icae.max_positions is not None and prefix.shape[0] + steps > icae.max_positions
    positions = None
    if not long:
        spans = [(s.token_count, s.num_slots) for s in memory]
        positions = icae.decoder_positions(spans, "ft", len(prompt_ids))
    expected = naive_greedy(icae, prefix, positions, steps, memory_logits(icae, long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # past the window the slots lose their layout (warned)
        text = icae.generate(memory, prompt, max_new_tokens=steps)
    return text, icae.tokenizer.decode(expected, skip_special_tokens=True)


def plain_case(icae: ICAE, prompt: str, steps: int) -> tuple[str, str]:
    """(generated text, the naive loop's text) without memory."""
    prompt_ids = icae.prompt_ids(prompt)
    with torch.no_grad():
        prefix = icae.model.get_input_embeddings()(torch.tensor(prompt_ids))
    long = icae.max_positions is not None and prefix.shape[0] + steps > icae.max_positions
    expected = naive_greedy(icae, prefix, None, steps, plain_logits(icae, long))
    text = icae.generate([], prompt, max_new_tokens=steps)
    return text, icae.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.fixture
def spread_icae(make_icae) -> ICAE:
    """A tiny trained-looking ICAE laid out like the shipped one: spread slot positions and a
    decoder adapter of its own."""
    return make_icae(trained=True, slot_positions="spread", decoder_lora_rank=4)


def document(length: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (length,), generator=generator).tolist()


@pytest.mark.parametrize("window", [None, 48], ids=["inside-window", "past-window"])
def test_greedy_from_memory_equals_the_naive_loop(spread_icae, window):
    if window is not None:
        spread_icae.model.config.max_position_embeddings = window
    memory = spread_icae.compress([document(TINY_ICAE_CONFIG["span_tokens"] * 2 + 7)])
    text, expected = memory_case(spread_icae, memory, "Where is it?", 40)
    assert expected  # the reference says something, so the comparison means something
    assert text == expected


@pytest.mark.parametrize("window", [None, 24], ids=["inside-window", "past-window"])
def test_greedy_without_memory_equals_the_naive_loop(spread_icae, window):
    if window is not None:
        spread_icae.model.config.max_position_embeddings = window
    text, expected = plain_case(spread_icae, "Tell me about the sea and the ships.", 40)
    assert expected
    assert text == expected


@pytest.mark.slow
def test_smollm2_greedy_equals_the_naive_loop():
    icae = ICAE.from_pretrained(dtype="float32")
    memory = icae.compress(
        "The lighthouse keeper, Mara Quell, rowed to the mainland every Tuesday to buy lamp oil "
        "and bread, and in 1911 she rescued eleven sailors from the wrecked schooner Albatross."
    )
    results = [
        memory_case(icae, memory, "Who rescued the sailors, and when?", 12),
        plain_case(icae, "Name three colours of the rainbow.", 12),
    ]
    icae.model.config.max_position_embeddings = 64  # past the window, cheaply
    results.append(plain_case(icae, "Name three colours of the rainbow, then explain why.", 40))
    for text, expected in results:
        assert expected
        assert text == expected
