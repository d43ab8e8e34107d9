"""Fast compression paths must give the reference path's slots within a stated tolerance.

The tolerance here is for float32 (the tiny models' dtype): the compiled path reorders float
additions when it fuses ops, nothing more, so slots agree to float32 rounding. On the real
model in bf16 the benchmark (benchmarks/icae_compress.py --paths compiled) reports the gap.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import randomise_trained_tensors, tiny_icae

from icmem.icae import ICAEConfigError

FLOAT32_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def test_compiled_encoder_gives_the_reference_slots(tokenizer):
    # spread positions, pooled residual and an early exit: every branch of the encoder
    recipe = {"slot_positions": "spread", "slot_head": "scale", "slot_residual": "pooled"}
    icae = tiny_icae(tokenizer, slot_layer=1, **recipe).eval()
    randomise_trained_tensors(icae)
    generator = torch.Generator().manual_seed(4)
    spans = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in (32, 7, 19)]
    reference = [s.tensor for s in icae.compress(spans)]

    icae.set_encoder_path("compiled")
    compiled = [s.tensor for s in icae.compress(spans)]
    for fast, ref in zip(compiled, reference, strict=True):
        torch.testing.assert_close(fast, ref, **FLOAT32_TOLERANCE)

    icae.set_encoder_path("reference")  # back to eager: a fresh merged copy, same slots
    again = [s.tensor for s in icae.compress(spans)]
    for a, b in zip(again, reference, strict=True):
        assert torch.equal(a, b)


def test_an_unknown_encoder_path_is_refused(tokenizer):
    icae = tiny_icae(tokenizer)
    with pytest.raises(ICAEConfigError, match="use one of"):
        icae.set_encoder_path("onnx")
