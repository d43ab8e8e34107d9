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


class AttentionSpy:
    """Wraps SDPA and records, per call, whether it got a mask and ran its causal kernel."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[bool, bool]] = []
        real = torch.nn.functional.scaled_dot_product_attention

        def spy(*args, attn_mask=None, is_causal=False, **kwargs):
            self.calls.append((attn_mask is not None, is_causal))
            return real(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


def test_compression_runs_the_causal_kernel_without_a_mask(tokenizer, monkeypatch):
    # Spans of mixed lengths (so rows carry padding) at spread positions, which without an
    # explicit mask read as packed sequences: the attention must still get no mask and run
    # SDPA's causal kernel, as a plain forward does (a 4D mask costs about 1.6x the attention
    # time of SmolLM2 in bf16 on CPU), and each span must get the slots it gets alone.
    recipe = {"slot_positions": "spread", "slot_head": "scale", "slot_residual": "pooled"}
    icae = tiny_icae(tokenizer, **recipe).eval()
    randomise_trained_tensors(icae)
    generator = torch.Generator().manual_seed(5)
    spans = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in (32, 7, 19)]
    alone = [icae.compress(span)[0].tensor for span in spans]

    spy = AttentionSpy(monkeypatch)
    together = [s.tensor for s in icae.compress(spans, batch_size=len(spans))]
    layers = icae.model.config.num_hidden_layers
    assert spy.calls == [(False, True)] * layers  # one batched forward, causal kernel, no mask
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a, b, **FLOAT32_TOLERANCE)

    # The spy sees the slow path when there is one: a mask with a masked key builds a 4D mask.
    spy.calls.clear()
    ids = torch.tensor([spans[0]])
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with torch.no_grad():
        icae.model(input_ids=ids, attention_mask=mask)
    assert spy.calls == [(True, False)] * layers
