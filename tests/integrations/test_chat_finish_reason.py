"""A reply that repeats itself is cut and says so: `Reply.finish_reason` and ChatICAE's
`response_metadata["finish_reason"] == "repetition"` (the contract memory middleware reads to
keep looping replies out of memory)."""

from __future__ import annotations

import functools
import operator

import pytest
import torch
from icmem.integrations.langchain import ChatICAE
from icmem.store import MemoryStore
from tiny_models import TINY_ICAE_CONFIG, tiny_embedder, tiny_icae_base, tiny_tokenizer

from icmem.icae import ICAE
from icmem.icae.decoder import REPEAT_MIN_TOKENS
from icmem.pipeline import MemoryPipeline

NS = ("tenant", "agent", "loops")


@pytest.fixture(scope="module")
def looping_pipeline(tmp_path_factory):
    """A pipeline whose model says one word forever: its head prefers `word` whatever it
    reads."""
    tokenizer = tiny_tokenizer()
    word = tokenizer(" fox", add_special_tokens=False)["input_ids"][0]
    base = tiny_icae_base(0)
    hidden, vocab = base.config.hidden_size, base.config.vocab_size
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[word] = 10.0
    base.lm_head = head
    icae = ICAE.from_base((base, tokenizer), **TINY_ICAE_CONFIG).eval()
    embedder = tiny_embedder(tokenizer)
    store = MemoryStore.open(
        tmp_path_factory.mktemp("loops"), dim=embedder.dim, model_fingerprint=icae.fingerprint
    )
    pipeline = MemoryPipeline(icae, store, embedder)
    pipeline.ingest("The quick brown fox jumps over the lazy dog.", namespace=NS)
    yield pipeline
    pipeline.close()


def test_a_looping_reply_is_cut_and_reported(looping_pipeline):
    reply = looping_pipeline.reply("What jumps?", namespace=NS, max_new_tokens=64)
    text = "".join(reply.pieces)
    assert reply.finish_reason == "repetition"
    words = len(looping_pipeline.token_ids(text))
    assert REPEAT_MIN_TOKENS <= words < 64  # cut once three copies cover the minimum


def test_greedy_without_the_remedy_runs_to_the_budget(looping_pipeline):
    reply = looping_pipeline.reply("What jumps?", namespace=NS, max_new_tokens=40, repeat_stop=0)
    text = "".join(reply.pieces)
    assert reply.finish_reason == "length"
    assert len(looping_pipeline.token_ids(text)) == 40


def test_chat_model_reports_the_finish_reason(looping_pipeline):
    chat = ChatICAE(pipeline=looping_pipeline, namespace=NS, max_tokens=64)
    message = chat.invoke("What jumps?")
    assert message.response_metadata["finish_reason"] == "repetition"
    streamed = functools.reduce(operator.add, chat.stream("What jumps?"))
    assert streamed.response_metadata["finish_reason"] == "repetition"
    short = ChatICAE(pipeline=looping_pipeline, namespace=NS, max_tokens=4)
    assert short.invoke("What jumps?").response_metadata["finish_reason"] == "length"
    stopped = ChatICAE(pipeline=looping_pipeline, namespace=NS, max_tokens=64, stop=["fox fox"])
    assert stopped.invoke("What jumps?").response_metadata["finish_reason"] == "stop"
