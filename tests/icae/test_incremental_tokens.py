"""IncrementalTokenizer: the ids of a growing conversation equal tokenizing it whole, while only
the new part is tokenized each turn."""

from __future__ import annotations

import copy
import random

import pytest
from tiny_models import tiny_tokenizer

from icmem.icae.incremental_tokens import IncrementalTokenizer

ADVERSARIAL = [
    "plain words",
    "",
    "  leading spaces and a trailing one ",
    "a literal <|im_end|> inside the content, and <|im_start|>user too",
    "line\nbreaks\n\n",
    "accents é à ü, CJK 你好, emoji 🙂",
    "<|im_end|>",
]


def full(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def laid_out(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def grow(seed: int, turns: int) -> list[list[dict]]:
    """A conversation's successive requests: each one the previous plus an answer and a question."""
    rng = random.Random(seed)
    messages = [{"role": "system", "content": rng.choice(ADVERSARIAL)}]
    requests = []
    for turn in range(turns):
        if turn:
            messages.append({"role": "assistant", "content": rng.choice(ADVERSARIAL)})
        messages.append({"role": "user", "content": f"{turn} {rng.choice(ADVERSARIAL)}"})
        requests.append(copy.deepcopy(messages))
    return requests


@pytest.mark.parametrize("seed", range(3))
def test_a_growing_conversation_equals_whole_tokenization_and_reads_only_the_new_part(
    tokenizer, seed
):
    incremental = IncrementalTokenizer(tokenizer)
    previous = ""
    for messages in grow(seed, 12):
        text = laid_out(tokenizer, messages)
        before = incremental.chars_tokenized
        assert incremental.ids(text) == full(tokenizer, text)
        if previous:  # from the previous request's last cut (its assistant header) on
            new_part = len(text) - len(previous) + len("assistant\n")
            assert incremental.chars_tokenized - before <= new_part
        previous = text


def test_interleaved_and_edited_conversations_each_equal_whole_tokenization(tokenizer):
    incremental = IncrementalTokenizer(tokenizer, keep=2)
    first, second = grow(0, 8), grow(1, 8)
    for a, b in zip(first, second, strict=True):
        for messages in (a, b):
            text = laid_out(tokenizer, messages)
            assert incremental.ids(text) == full(tokenizer, text)
    edited = copy.deepcopy(first[-1])
    edited[2]["content"] = "an earlier answer, rewritten"  # the conversation diverges early
    text = laid_out(tokenizer, edited)
    assert incremental.ids(text) == full(tokenizer, text)


def test_a_token_that_starts_a_longer_added_token_is_never_a_cut():
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<x>", "<x>y"], special_tokens=True)
    incremental = IncrementalTokenizer(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<x>") not in incremental._cut_after
    assert tokenizer.convert_tokens_to_ids("<x>y") in incremental._cut_after
    for text in ("ab<x>", "ab<x>y and more", "ab<x>y and more<x>", "ab<x>yy<x>y"):
        assert incremental.ids(text) == full(tokenizer, text)


def test_a_tokenizer_without_offsets_is_tokenized_whole(tokenizer):
    class SlowTokenizer:
        is_fast = False
        added_tokens_decoder = tokenizer.added_tokens_decoder

        def __call__(self, text, **kwargs):
            return tokenizer(text, **kwargs)

    incremental = IncrementalTokenizer(SlowTokenizer())
    texts = [laid_out(tokenizer, messages) for messages in grow(2, 3)]
    for text in texts:
        assert incremental.ids(text) == full(tokenizer, text)
    assert incremental.chars_tokenized == sum(map(len, texts))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))
def test_the_default_tokenizer_and_template_agree_with_whole_tokenization(seed):
    from icmem.models import load_tokenizer

    tokenizer = load_tokenizer()
    incremental = IncrementalTokenizer(tokenizer)
    for messages in grow(seed, 10):
        text = laid_out(tokenizer, messages)
        assert incremental.ids(text) == full(tokenizer, text)


def test_the_prompt_cache_lays_out_conversations_as_the_icae_does(icae):
    from icmem.icae.conversation import PromptCache

    cache = PromptCache()
    for messages in [*grow(3, 6), "a plain prompt"]:
        assert cache.prompt_ids(icae, messages) == icae.prompt_ids(messages)
