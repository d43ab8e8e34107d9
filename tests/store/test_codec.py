"""The slot codec: round trips, per-codec error bounds, and refusals of damaged or foreign blobs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from icmem.codec import (
    CODECS,
    CorruptSlotBlobError,
    SlotCodecError,
    SlotFingerprintMismatchError,
    decode_slots,
    encode_slots,
    read_slot_header,
)

FP = "smollm2-135m-instruct@sha256:abc"


def _slots(k: int = 16, d: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, d)).astype(np.float32)


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_keeps_shape_dtype_and_header(codec: str) -> None:
    slots = _slots()
    blob = encode_slots(slots, codec=codec, fingerprint=FP)
    decoded, header = decode_slots(blob, expected_fingerprint=FP)
    assert decoded.dtype == np.float32
    assert decoded.shape == (16, 32)
    assert header.codec == codec
    assert header.shape == (16, 32)
    assert header.fingerprint == FP
    assert read_slot_header(blob) == header


def test_fp32_is_exact() -> None:
    slots = _slots()
    decoded, _ = decode_slots(encode_slots(slots, codec="fp32", fingerprint=FP))
    np.testing.assert_array_equal(decoded, slots)


def test_bf16_matches_reference_rounding() -> None:
    # Reference: round-half-to-even on the dropped 16 bits, computed with Python integers.
    slots = _slots(8, 64, seed=3) * 1000
    decoded, _ = decode_slots(encode_slots(slots, codec="bf16", fingerprint=FP))
    for value, got in zip(slots.ravel(), decoded.ravel(), strict=True):
        bits = int(np.float32(value).view(np.uint32))
        upper, lower = bits >> 16, bits & 0xFFFF
        if lower > 0x8000 or (lower == 0x8000 and upper & 1):
            upper += 1
        assert int(got.view(np.uint32)) == upper << 16


def test_bf16_ties_round_to_even() -> None:
    # 1 + 2**-8 lies exactly between bf16 neighbours 1 and 1 + 2**-7: even mantissa (1.0) wins.
    # 1 + 3 * 2**-8 lies between 1 + 2**-7 (odd) and 1 + 2**-6 (even): rounds up.
    values = np.array([[1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)]], dtype=np.float32)
    decoded, _ = decode_slots(encode_slots(values, codec="bf16", fingerprint=FP))
    np.testing.assert_array_equal(decoded, [[1.0, 1 + 2**-6, -1.0]])


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 8), st.integers(1, 16)),
        elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False),
    )
)
def test_error_bounds_per_codec(slots: np.ndarray) -> None:
    bf16, _ = decode_slots(encode_slots(slots, codec="bf16", fingerprint=FP))
    assert np.all(np.abs(bf16 - slots) <= np.abs(slots) * 2.0**-8)  # unit roundoff

    fp16, _ = decode_slots(encode_slots(slots, codec="fp16", fingerprint=FP))
    assert np.all(np.abs(fp16 - slots) <= np.maximum(np.abs(slots) * 2.0**-11, 2.0**-24))

    int8, _ = decode_slots(encode_slots(slots, codec="int8", fingerprint=FP))
    column_max = np.abs(slots).max(axis=0)
    assert np.all(np.abs(int8 - slots) <= column_max / 254 * (1 + 1e-5) + 1e-30)


def test_int8_keeps_direction_of_gaussian_slots() -> None:
    slots = _slots(128, 576, seed=1)
    decoded, _ = decode_slots(encode_slots(slots, codec="int8", fingerprint=FP))
    cosine = (
        (decoded * slots).sum(1) / np.linalg.norm(decoded, axis=1) / np.linalg.norm(slots, axis=1)
    )
    assert cosine.min() > 0.999


def test_int8_all_zero_column_decodes_to_zero() -> None:
    slots = _slots(4, 8)
    slots[:, 3] = 0
    decoded, _ = decode_slots(encode_slots(slots, codec="int8", fingerprint=FP))
    np.testing.assert_array_equal(decoded[:, 3], 0)


@pytest.mark.parametrize(
    ("codec", "bytes_per_value"), [("fp32", 4), ("fp16", 2), ("bf16", 2), ("int8", 1)]
)
def test_payload_sizes(codec: str, bytes_per_value: int) -> None:
    header = read_slot_header(encode_slots(_slots(128, 576), codec=codec, fingerprint=FP))
    extra = 4 * 576 if codec == "int8" else 0
    assert header.payload_nbytes == 128 * 576 * bytes_per_value + extra


def test_float64_and_float16_inputs_are_accepted() -> None:
    slots = _slots(2, 4)
    for dtype in (np.float64, np.float16):
        decoded, _ = decode_slots(encode_slots(slots.astype(dtype), codec="fp32", fingerprint=FP))
        np.testing.assert_array_equal(decoded, slots.astype(dtype).astype(np.float32))


def test_wrong_fingerprint_is_refused_with_both_names() -> None:
    blob = encode_slots(_slots(), fingerprint="model-a")
    with pytest.raises(SlotFingerprintMismatchError, match=r"model-a.*model-b"):
        decode_slots(blob, expected_fingerprint="model-b")


@pytest.mark.parametrize("cut", [0, 5, 30, -1])
def test_truncated_blob_is_refused(cut: int) -> None:
    blob = encode_slots(_slots(), fingerprint=FP)
    with pytest.raises(CorruptSlotBlobError, match="truncated"):
        decode_slots(blob[:cut])


def test_flipped_payload_byte_fails_checksum() -> None:
    blob = bytearray(encode_slots(_slots(), fingerprint=FP))
    blob[-10] ^= 0x40
    with pytest.raises(CorruptSlotBlobError, match="checksum"):
        decode_slots(bytes(blob))


def test_flipped_fingerprint_byte_fails_checksum() -> None:
    blob = bytearray(encode_slots(_slots(), fingerprint=FP))
    blob[40] ^= 0x01  # inside the fingerprint text
    with pytest.raises(CorruptSlotBlobError, match="checksum"):
        decode_slots(bytes(blob))


def test_not_a_blob_is_refused() -> None:
    with pytest.raises(CorruptSlotBlobError, match="magic"):
        decode_slots(b"PK\x03\x04" + b"\0" * 200)


def test_future_format_version_is_refused() -> None:
    blob = bytearray(encode_slots(_slots(), fingerprint=FP))
    blob[4] = 99
    with pytest.raises(CorruptSlotBlobError, match="version 99"):
        decode_slots(bytes(blob))


@pytest.mark.parametrize(
    ("array", "kwargs", "message"),
    [
        (np.zeros((2, 3, 4), np.float32), {}, "2-D"),
        (np.zeros((0, 4), np.float32), {}, "non-empty"),
        (np.zeros((2, 4), np.int32), {}, "floating point"),
        (np.array([[1.0, np.nan]], np.float32), {}, "NaN"),
        (np.array([[1.0, np.inf]], np.float32), {}, "NaN or infinity"),
        (np.array([[1e6]], np.float32), {"codec": "fp16"}, "bf16"),
        (np.ones((2, 2), np.float32), {"codec": "q4"}, "unknown slot codec"),
        (np.ones((2, 2), np.float32), {"fingerprint": ""}, "fingerprint"),
    ],
)
def test_bad_input_is_refused(array: np.ndarray, kwargs: dict, message: str) -> None:
    kwargs = {"fingerprint": FP, **kwargs}
    with pytest.raises(SlotCodecError, match=message):
        encode_slots(array, **kwargs)
