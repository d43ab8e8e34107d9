"""The encoder: batching, padding, short spans, parity with a hand-built reference."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import TINY_ICAE_CONFIG

from icmem.icae import ICAEConfigError

K = TINY_ICAE_CONFIG["num_memory_tokens"]
SPAN = TINY_ICAE_CONFIG["span_tokens"]


def random_spans(count: int, seed: int = 0, low: int = 3, high: int = 500) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, SPAN + 1, (count,), generator=generator).tolist()
    return [torch.randint(low, high, (n,), generator=generator).tolist() for n in lengths]


def padded(spans: list[list[int]], side: str, pad_id: int = 0):
    width = max(map(len, spans))
    ids = torch.full((len(spans), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(spans), width, dtype=torch.long)
    for row, span in enumerate(spans):
        cols = slice(0, len(span)) if side == "right" else slice(width - len(span), width)
        ids[row, cols] = torch.tensor(span)
        mask[row, cols] = 1
    return ids, mask


def encode_alone(icae, span: list[int]) -> torch.Tensor:
    ids = torch.tensor([span])
    return icae.encode(ids, torch.ones_like(ids))[0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_encoding_equals_one_at_a_time(icae, side):
    spans = random_spans(16)
    with torch.no_grad():
        batched = icae.encode(*padded(spans, side))
        for row, span in enumerate(spans):
            torch.testing.assert_close(batched[row], encode_alone(icae, span), rtol=1e-3, atol=1e-5)


def test_padding_values_never_reach_the_slots(icae):
    spans = random_spans(4, seed=3)
    with torch.no_grad():
        with_zeros = icae.encode(*padded(spans, "left", pad_id=0))
        with_junk = icae.encode(*padded(spans, "left", pad_id=77))
    torch.testing.assert_close(with_zeros, with_junk, rtol=0, atol=0)


def test_compress_gives_the_same_slots_for_any_batch_size(icae):
    spans = random_spans(16, seed=5)
    alone = icae.compress(spans, batch_size=1)
    together = icae.compress(spans, batch_size=16)
    assert [s.span_id for s in alone] == [s.span_id for s in together]
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(a.tensor, b.tensor, rtol=1e-3, atol=1e-5)


def test_encoder_matches_a_hand_built_reference_with_the_adapter_merged(icae):
    span = random_spans(1, seed=7)[0]
    merged = copy.deepcopy(icae.model).merge_and_unload()  # plain model, LoRA folded in
    with torch.no_grad():
        embeds = torch.cat(
            [merged.get_input_embeddings()(torch.tensor(span)), icae.memory_embeddings]
        )[None]
        hidden = merged.model(inputs_embeds=embeds).last_hidden_state[0]
        expected = hidden[len(span) :]  # the k memory positions
        torch.testing.assert_close(encode_alone(icae, span), expected, rtol=1e-4, atol=1e-5)


def test_encoder_runs_with_the_adapter_on(make_icae):
    span = random_spans(1, seed=8)[0]
    untrained, trained = make_icae(trained=False), make_icae(trained=False)
    with torch.no_grad():
        for name, param in trained.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
        assert not torch.allclose(encode_alone(untrained, span), encode_alone(trained, span))


def test_short_spans_get_the_policy_slot_count_and_a_prefix_of_the_full_memory(icae):
    span = random_spans(1, seed=9)[0][:5]
    (slots,) = icae.compress([span])
    assert slots.tensor.shape == (icae.config.slots_for(5), icae.hidden_size) == (2, 64)
    with torch.no_grad():
        full = encode_alone(icae, span)  # all k memory tokens
    torch.testing.assert_close(slots.tensor, full[:2], rtol=1e-4, atol=1e-6)


def test_documents_split_into_consecutive_spans_in_order(icae):
    document = list(range(3, 3 + 2 * SPAN + 5))  # 2 full spans and a 5-token tail
    slots = icae.compress([document, document[:SPAN]], batch_size=3)
    assert [s.token_count for s in slots] == [SPAN, SPAN, 5, SPAN]
    assert [s.num_slots for s in slots] == [K, K, 2, K]
    assert slots[0].span_id == slots[3].span_id  # same tokens, same content id
    assert len({s.fingerprint for s in slots}) == 1 and slots[0].fingerprint == icae.fingerprint


def test_text_input_is_tokenized_without_special_tokens(icae):
    (from_text,) = icae.compress("Paris is the capital of France.")
    (from_ids,) = icae.compress([icae.tokenize("Paris is the capital of France.")])
    torch.testing.assert_close(from_text.tensor, from_ids.tensor)


def test_encode_is_differentiable_into_memory_embeddings_and_lora(icae):
    ids = torch.tensor(random_spans(2, seed=10)[0])[None]
    icae.encode(ids, torch.ones_like(ids)).square().sum().backward()
    assert icae.memory_embeddings.grad is not None and icae.memory_embeddings.grad.abs().sum() > 0
    lora_grads = [p.grad for n, p in icae.model.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    base = [p for n, p in icae.model.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in base)


@pytest.mark.parametrize(
    ("source", "message"),
    [([[]], "no tokens"), ([list(range(3, 3 + SPAN + 1))], None)],
)
def test_compress_input_errors(icae, source, message):
    if message is None:  # an over-long document is split, not refused
        assert len(icae.compress(source)) == 2
    else:
        with pytest.raises(ICAEConfigError, match=message):
            icae.compress(source)


def test_encode_refuses_overlong_and_empty_rows(icae):
    ids = torch.ones(1, SPAN + 1, dtype=torch.long)
    with pytest.raises(ICAEConfigError, match="split_spans"):
        icae.encode(ids, torch.ones_like(ids))
    with pytest.raises(ICAEConfigError, match="no tokens"):
        icae.encode(ids[:, :4], torch.zeros(1, 4, dtype=torch.long))
