"""MemorySlots serialisation: codec round trips on real encoder output, fingerprint checks."""

from __future__ import annotations

import pytest
import torch

from icmem.codec import CorruptSlotBlobError, SlotFingerprintMismatchError
from icmem.icae import MemorySlots


@pytest.fixture
def slots(icae) -> MemorySlots:
    return icae.compress("Alice and Bob met in Tokyo; Paris is the capital of France. " * 2)[0]


def test_fp32_round_trip_is_exact(slots):
    back = MemorySlots.from_bytes(slots.to_bytes("fp32"), span_id="s", token_count=3)
    assert torch.equal(back.tensor, slots.tensor)
    assert (back.span_id, back.token_count, back.fingerprint) == ("s", 3, slots.fingerprint)


@pytest.mark.parametrize(("codec", "bound"), [("bf16", 2**-8), ("fp16", 2**-10)])
def test_half_precision_codecs_keep_relative_error_small(slots, codec, bound):
    back = MemorySlots.from_bytes(slots.to_bytes(codec), expected_fingerprint=slots.fingerprint)
    assert len(slots.to_bytes(codec)) < slots.tensor.numel() * 2 + 200
    relative = (back.tensor - slots.tensor).abs() / slots.tensor.abs().clamp_min(1e-3)
    assert float(relative.max()) <= bound


def test_int8_codec_error_is_small_on_encoder_output(slots):
    back = MemorySlots.from_bytes(slots.to_bytes("int8"))
    cosine = torch.nn.functional.cosine_similarity(back.tensor, slots.tensor, dim=1)
    assert float(cosine.min()) > 0.999
    column_max = slots.tensor.abs().amax(0)
    assert bool(((back.tensor - slots.tensor).abs() <= column_max / 254 + 1e-6).all())


def test_decoded_slots_feed_the_decoder_like_the_originals(icae, slots):
    back = MemorySlots.from_bytes(slots.to_bytes("fp32"), expected_fingerprint=icae.fingerprint)
    assert icae.generate([back], "Hi", max_new_tokens=5) == icae.generate(
        [slots], "Hi", max_new_tokens=5
    )


def test_another_models_slots_are_refused(slots):
    with pytest.raises(SlotFingerprintMismatchError):
        MemorySlots.from_bytes(slots.to_bytes(), expected_fingerprint="someone-else")


def test_truncated_bytes_are_refused(slots):
    with pytest.raises(CorruptSlotBlobError):
        MemorySlots.from_bytes(slots.to_bytes()[:-3])


def test_slots_must_be_a_matrix():
    with pytest.raises(ValueError, match=r"\(k, d\)"):
        MemorySlots(tensor=torch.zeros(3), span_id=None, token_count=None, fingerprint="f")
