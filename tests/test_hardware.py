"""The dtype that runs fast here: bf16 only where the CPU (or a GPU) does it in hardware."""

from __future__ import annotations

import pytest
import torch

from icmem import hardware


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (frozenset({"avx2", "fma"}), "float32"),
        (frozenset({"avx2", "avx512f", "avx512_bf16"}), "bfloat16"),
        (frozenset({"avx2", "amx_tile", "amx_bf16"}), "bfloat16"),
        (frozenset(), "float32"),
    ],
)
def test_auto_picks_bf16_only_where_the_cpu_has_it(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.resolve_dtype("auto") == expected
    assert hardware.resolve_dtype("float32") == "float32"  # an explicit choice is kept
    assert hardware.resolve_dtype("bfloat16") == "bfloat16"


def test_a_gpu_means_bf16(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hardware.fast_dtype() == "bfloat16"


def test_auto_icae_loads_in_the_fast_dtype(monkeypatch, tokenizer):
    from tiny_models import tiny_icae_base

    from icmem.icae.model import ICAE

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    icae = ICAE.from_base((tiny_icae_base(), tokenizer), dtype="auto")
    assert icae.dtype == torch.float32 and icae.config.dtype == "auto"


def test_fp32_and_bf16_encoders_give_slots_within_the_codecs_tolerance(tokenizer):
    """Whichever dtype a machine compresses in, the stored slots agree: a bf16 encoder's slots
    are as close to the fp32 encoder's as the int8 codec keeps slots to its input (cosine
    similarity at least 0.999 per slot, see icmem/codec.py), and within 4x bf16 rounding."""
    from tiny_models import randomise_trained_tensors, tiny_icae

    recipe = {"slot_positions": "spread", "slot_head": "scale", "slot_residual": "pooled"}
    fp32 = tiny_icae(tokenizer, **recipe)
    randomise_trained_tensors(fp32)
    bf16 = tiny_icae(tokenizer, **recipe)
    randomise_trained_tensors(bf16)  # the same seeds: the same trained tensors
    bf16 = bf16.to(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    spans = [torch.randint(3, 500, (n,), generator=generator).tolist() for n in (32, 17, 25)]
    for exact, rounded in zip(fp32.compress(spans), bf16.compress(spans), strict=True):
        x, y = exact.tensor.float(), rounded.tensor.float()
        assert exact.tensor.dtype == torch.float32 and rounded.tensor.dtype == torch.bfloat16
        assert torch.nn.functional.cosine_similarity(x, y, dim=-1).min() >= 0.999
        assert (x - y).norm() / x.norm() <= 4 * 2**-8


def test_decoding_can_run_in_its_own_dtype(monkeypatch, tokenizer):
    """``auto`` decodes in the model's dtype (fp32 without bf16 hardware); ``decode_dtype``
    puts decoding (from memory, the decoder adapter merged, and without) in bf16 copies while
    slots still come from the fp32 encoder and the distillation teacher keeps the model's own
    weights."""
    from tiny_models import randomise_trained_tensors, tiny_icae_base

    from icmem.icae.model import ICAE

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = {"slot_positions": "spread", "decoder_lora_rank": 4}
    icae = ICAE.from_base((tiny_icae_base(), tokenizer), dtype="auto", **recipe).eval()
    randomise_trained_tensors(icae)
    assert icae.dtype == torch.float32 and icae.decoder.dtype == torch.float32
    icae.decoder.decode_dtype = "bfloat16"
    assert icae.decoder.dtype == torch.bfloat16
    memory = icae.compress([list(range(3, 40))])
    assert memory[0].tensor.dtype == torch.float32
    for read in (memory, []):  # inputs reach the bf16 copies in their dtype
        assert isinstance(icae.generate(read, "Where?", max_new_tokens=4), str)
    for reads_memory in (True, False):
        assert icae.decoder.model(reads_memory).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in icae.model.parameters())  # not converted
    with icae.base_model() as teacher:
        assert teacher.dtype == torch.float32
    icae.decoder.decode_dtype = "float32"
    assert icae.decoder.model(True).dtype == torch.float32

    explicit = ICAE.from_base((tiny_icae_base(), tokenizer), dtype="float32", **recipe)
    assert explicit.decoder.dtype == torch.float32
