"""Conversations past the model's window: the memory block stays in view (a toy trained here to
answer from memory still answers after three windows of conversation), and the prompt cache
reads only what a turn adds."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from icmem.icae import ICAE, ICAEExample
from icmem.icae.conversation import DecoderSession, PromptCache
from icmem.icae.decoder import Sampling
from icmem.icae.errors import ICAEConfigError

WINDOW = 64  # the toy's pretraining length
SLOTS = 8
VALUES = list(range(10, 26))  # the facts: one token each
FILLER = list(range(26, 40))  # conversation tokens that are never facts
QUESTION = 6
GREEDY = Sampling()


@pytest.fixture(scope="module")
def recalling_icae():
    """A tiny ICAE trained to answer QUESTION with the value its memory holds, whatever
    conversation (up to the window's room) lies between the memory and the question."""
    from tiny_models import tiny_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = tiny_model("llama", hidden_size=64, layers=2, vocab_size=512, max_positions=WINDOW)
    icae = ICAE.from_base(
        (base, tiny_tokenizer()),
        num_memory_tokens=SLOTS,
        span_tokens=SLOTS,
        min_memory_tokens=1,
        lora_rank=8,
        lora_alpha=16,
        lora_dropout=0.0,
        decoder_lora_rank=8,
    )
    optimizer = torch.optim.AdamW(icae.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    icae.train()
    room = WINDOW - SLOTS - 1
    for _ in range(300):
        examples = []
        for _ in range(16):
            value = VALUES[int(torch.randint(len(VALUES), (1,), generator=generator))]
            length = int(torch.randint(0, room - 2, (1,), generator=generator))
            filler = torch.tensor(FILLER)[
                torch.randint(len(FILLER), (length,), generator=generator)
            ]
            prompt = [*filler.tolist(), QUESTION]
            examples.append(ICAEExample([value] * SLOTS, "ft", [value], prompt))
        loss = icae.training_loss(examples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return icae.eval()


def conversation(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    filler = torch.tensor(FILLER)[torch.randint(len(FILLER), (length,), generator=generator)]
    return [*filler.tolist(), QUESTION]


def answer(icae: ICAE, value: int, ids: list[int]) -> int:
    (memory,) = icae.compress([[value] * SLOTS])
    session = DecoderSession(icae, [memory], [])
    return next(session.generate(ids, 1, GREEDY))


def test_a_fact_in_memory_is_answered_after_three_windows(recalling_icae):
    short = [answer(recalling_icae, v, conversation(10, v)) for v in VALUES]
    assert sum(a == v for a, v in zip(short, VALUES, strict=True)) >= 0.9 * len(VALUES)
    long = [answer(recalling_icae, v, conversation(3 * WINDOW + 7, v)) for v in VALUES]
    assert sum(a == v for a, v in zip(long, VALUES, strict=True)) >= 0.9 * len(VALUES)
    # the answer comes from the memory: another value's slots give that value instead
    swapped = [
        answer(recalling_icae, VALUES[(i + 3) % 16], conversation(3 * WINDOW + 7, i))
        for i in range(16)
    ]
    expected = [VALUES[(i + 3) % 16] for i in range(16)]
    assert sum(a == e for a, e in zip(swapped, expected, strict=True)) >= 0.9 * len(VALUES)


def test_the_session_state_stays_bounded(recalling_icae):
    (memory,) = recalling_icae.compress([[VALUES[0]] * SLOTS])
    session = DecoderSession(recalling_icae, [memory], [])
    list(session.generate(conversation(5 * WINDOW, 0), 4, GREEDY))
    extent = SLOTS + 1  # slots and [FT]
    for layer in session.cache.layers:
        assert len(layer.held_positions()) == SLOTS + 1 + (WINDOW - extent)


def test_a_turn_that_extends_the_last_reads_only_its_new_tokens(recalling_icae):
    (memory,) = recalling_icae.compress([[VALUES[3]] * SLOTS])
    cache = PromptCache(max_sessions=2, window=WINDOW)
    icae = recalling_icae
    first = [{"role": "user", "content": "hello there"}]
    answer_ids = list(cache.generate(icae, [memory], first, 5, GREEDY))
    read_after_first = cache.stats["tokens_read"]
    assert cache.stats == {"reused": 0, "rebuilt": 1, "tokens_read": len(icae.prompt_ids(first))}
    second = [
        *first,
        {"role": "assistant", "content": icae.tokenizer.decode(answer_ids)},
        {"role": "user", "content": "and then?"},
    ]
    again = list(cache.generate(icae, [memory], second, 5, GREEDY))
    assert cache.stats["reused"] == 1
    new_tokens = cache.stats["tokens_read"] - read_after_first
    # the first turn and the answer (already read while generating it) are not read again
    first_turn = len(icae.prompt_ids(first)) + len(answer_ids)
    assert new_tokens == len(icae.prompt_ids(second)) - first_turn
    # reading incrementally gives what reading the whole conversation at once gives
    fresh = PromptCache(max_sessions=0, window=WINDOW)
    assert list(fresh.generate(icae, [memory], second, 5, GREEDY)) == again


def test_other_memory_rebuilds_from_at_most_one_window(recalling_icae):
    icae = recalling_icae
    memories = icae.compress([[VALUES[1]] * SLOTS, [VALUES[2]] * SLOTS])
    cache = PromptCache(max_sessions=4, window=WINDOW)
    long = [{"role": "user", "content": "word " * 200}]
    list(cache.generate(icae, memories[:1], long, 2, GREEDY))
    list(cache.generate(icae, memories[1:], long, 2, GREEDY))
    assert cache.stats["rebuilt"] == 2
    assert cache.stats["tokens_read"] <= 2 * (WINDOW - SLOTS - 1)


def test_a_session_refuses_a_conversation_it_has_not_read(recalling_icae):
    (memory,) = recalling_icae.compress([[VALUES[0]] * SLOTS])
    session = DecoderSession(recalling_icae, [memory], [])
    list(session.generate([30, 31, QUESTION], 1, GREEDY))
    with pytest.raises(ICAEConfigError, match="rebuild the session"):
        list(session.generate([31, 30, QUESTION, 7], 1, GREEDY))
