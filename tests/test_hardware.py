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
