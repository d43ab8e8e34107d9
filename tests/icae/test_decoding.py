"""The one sampling loop and the one token chooser: loop remedies, finish reasons, known
answers on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from icmem.icae import ICAEConfigError, Sampling
from icmem.icae.decoder import (
    REPEAT_MIN_TOKENS,
    next_token,
    repeats_itself,
    sample_tokens,
)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([3.0, 2.9, 0.0])
    assert next_token(logits, Sampling(), history=[0]) == 0  # off by default: plain greedy
    # 3.0 / 1.1 = 2.73 falls below 2.9
    assert next_token(logits, Sampling(repetition_penalty=1.1), history=[0]) == 1
    negative = torch.tensor([-1.0, -1.05, -5.0])
    # -1.0 * 2 = -2.0 falls below -1.05
    assert next_token(negative, Sampling(repetition_penalty=2.0), history=[0]) == 1
    assert torch.equal(logits, torch.tensor([3.0, 2.9, 0.0]))  # the caller's logits untouched


def test_no_repeat_ngram_bans_exactly_the_completions_of_a_seen_ngram():
    logits = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 2.0])
    history = [5, 7, 3, 5]  # the bigram (5, 7) was said: after 5, 7 is banned
    assert next_token(logits, Sampling(no_repeat_ngram_size=2), history=history) == 5
    assert next_token(logits, Sampling(no_repeat_ngram_size=3), history=history) == 7
    assert next_token(logits, Sampling(no_repeat_ngram_size=1), history=[7]) == 5


def test_a_reply_repeats_itself_once_copies_cover_the_minimum():
    unit = [11, 12, 13, 14, 15, 16]  # 3 copies = 18 tokens >= REPEAT_MIN_TOKENS
    assert 3 * len(unit) >= REPEAT_MIN_TOKENS
    assert repeats_itself([1, 2, *unit * 3], 3)
    assert not repeats_itself([1, 2, *unit * 2], 3)
    assert not repeats_itself([1, 2, *unit * 2], 2)  # 12 tokens: not yet a loop
    assert repeats_itself([1, 2, *[*unit, 17, 18] * 2], 2)  # 16 tokens
    assert not repeats_itself([4, 4, 4], 3)  # a short run is text, not a loop
    assert not repeats_itself(list(range(40)), 2)


class Script:
    """A fake decoder that prefers the tokens of a script in turn (the logits one-hot)."""

    def __init__(self, tokens: list[int], vocab: int = 32) -> None:
        self.tokens, self.vocab, self.reads = tokens, vocab, 0

    def logits(self, _token: int | None = None) -> torch.Tensor:
        out = torch.zeros(self.vocab)
        out[self.tokens[min(self.reads, len(self.tokens) - 1)]] = 5.0
        self.reads += 1
        return out


def run(script: Script, sampling: Sampling, max_new_tokens: int = 64) -> tuple[list[int], str]:
    stream = sample_tokens(
        script.logits(),
        script.logits,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_ids=frozenset({0}),
    )
    tokens = list(stream)
    assert stream.finish_reason is not None
    return tokens, stream.finish_reason


def test_finish_reasons_stop_length_and_repetition():
    looping = [9, 8, 7, 6, 5, 4, 3, 2] * 8
    assert run(Script([5, 6, 0, 7]), Sampling()) == ([5, 6], "stop")
    assert run(Script(looping), Sampling(), max_new_tokens=20) == (looping[:20], "length")
    tokens, reason = run(Script(looping), Sampling(repeat_stop=3))
    assert (tokens, reason) == (looping[:24], "repetition")  # cut after the third copy
    tokens, reason = run(Script(looping), Sampling(repeat_stop=2))
    assert (tokens, reason) == (looping[:16], "repetition")


def test_min_new_tokens_keeps_the_stop_token_out_of_the_first_choices():
    tokens, reason = run(Script([0, 0, 0, 4, 0]), Sampling(min_new_tokens=2))
    # the stop is the best choice each time; the next best (token 1, all equal) stands in
    assert (tokens, reason) == ([1, 1], "stop")


def test_the_loop_reads_no_token_past_its_last_choice():
    script = Script([5, 6, 7, 8])
    run(script, Sampling(), max_new_tokens=3)
    assert script.reads == 3  # the prefix's logits, then one read per token but the last


def test_no_repeat_ngrams_break_a_loop_greedy_would_fall_into():
    looping = [9, 8, 7] * 10
    tokens, reason = run(Script(looping), Sampling(no_repeat_ngram_size=3), max_new_tokens=12)
    # (9, 8, 7) again is banned at its 7; the next best token (0, all logits equal) is the stop
    assert (tokens, reason) == ([9, 8, 7, 9, 8], "stop")


def test_a_seeded_sample_is_repeatable():
    logits = torch.zeros(50)
    settings = Sampling(temperature=1.0, seed=3)
    first = [next_token(logits, settings, torch.Generator().manual_seed(3)) for _ in range(5)]
    again = [next_token(logits, settings, torch.Generator().manual_seed(3)) for _ in range(5)]
    assert first == again


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"repeat_stop": 1}, "repeat_stop"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
    ],
)
def test_bad_loop_settings_are_refused(kwargs, message):
    with pytest.raises(ICAEConfigError, match=message):
        Sampling(**kwargs)
