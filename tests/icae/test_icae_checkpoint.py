"""Checkpoints: round trip, plain-peft loading, base-model checks, damaged files, no pickle."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_icae_base

from icmem.icae import (
    ICAE,
    BaseModelMismatchError,
    CheckpointError,
    CorruptCheckpointError,
    NoDefaultCheckpointError,
)
from icmem.icae import checkpoint as checkpoint_module

TEXTS = ["Paris is the capital of France.", "Alice and Bob met in Tokyo. " * 4]


@pytest.fixture
def saved(icae, tmp_path):
    return icae.save_pretrained(tmp_path / "ckpt")


def test_save_then_load_gives_identical_slots(icae, saved, tokenizer):
    loaded = ICAE.from_pretrained(saved, base_model=(tiny_icae_base(0), tokenizer))
    assert loaded.config == icae.config and loaded.fingerprint == icae.fingerprint
    for before, after in zip(icae.compress(TEXTS), loaded.compress(TEXTS), strict=True):
        torch.testing.assert_close(after.tensor, before.tensor, rtol=0, atol=0)
    torch.testing.assert_close(loaded.special_embeddings, icae.special_embeddings)


def test_dtype_can_be_overridden_at_load(saved, tokenizer):
    loaded = ICAE.from_pretrained(
        saved, base_model=(tiny_icae_base(0), tokenizer), dtype="bfloat16"
    )
    assert loaded.dtype == torch.bfloat16 and loaded.config.dtype == "bfloat16"
    assert loaded.compress("Paris")[0].tensor.dtype == torch.bfloat16


def test_checkpoint_holds_only_trained_tensors_as_safetensors_and_json(icae, saved):
    from safetensors.torch import load_file

    names = {p.name for p in saved.iterdir()}
    assert {"icae_config.json", "adapter_config.json", "adapter_model.safetensors"} <= names
    assert all(n.endswith((".json", ".safetensors", ".md")) for n in names)  # no pickle
    stored = sum(
        t.numel()
        for n in names
        if n.endswith(".safetensors")
        for t in load_file(saved / n).values()
    )
    assert stored == sum(p.numel() for p in icae.trainable_parameters())
    manifest = json.loads((saved / "icae_config.json").read_text())
    assert manifest["base_model_fingerprint"] == icae.fingerprint
    assert manifest["config"]["base_model"] == icae.config.base_model


def test_adapter_loads_with_plain_peft(icae, saved):
    from peft import PeftModel

    plain = PeftModel.from_pretrained(tiny_icae_base(0), saved)
    ours = dict(icae.model.named_parameters())
    lora = {n: p for n, p in plain.named_parameters() if "lora_" in n}
    assert lora and all(torch.equal(p, ours[n]) for n, p in lora.items())


def test_loading_onto_another_base_model_names_both(saved, tokenizer):
    other = tiny_icae_base(seed=9)
    other.config.name_or_path = "some-other-model"
    with pytest.raises(BaseModelMismatchError) as error:
        ICAE.from_pretrained(saved, base_model=(other, tokenizer))
    assert "some-other-model" in str(error.value) and "custom" in str(error.value)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "icae_embeddings.safetensors"])
def test_truncated_tensor_files_fail_cleanly(saved, tokenizer, name):
    path = saved / name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="truncated or damaged"):
        ICAE.from_pretrained(saved, base_model=(tiny_icae_base(0), tokenizer))


def test_tensor_file_unreadable_despite_matching_hash_fails_cleanly(saved, tokenizer):
    path = saved / "icae_embeddings.safetensors"
    path.write_bytes(b"\x00" * 16)
    manifest = json.loads((saved / "icae_config.json").read_text())
    manifest["files"][path.name] = checkpoint_module._sha256(path)
    (saved / "icae_config.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="cannot read"):
        ICAE.from_pretrained(saved, base_model=(tiny_icae_base(0), tokenizer))


def test_corrupt_manifest_fails_cleanly(saved):
    (saved / "icae_config.json").write_text('{"format_version": 1, "config": ')
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        ICAE.from_pretrained(saved)


@pytest.mark.parametrize("manifest", ["5", "null", "[1, 2]", '"text"'])
def test_a_manifest_that_is_not_an_object_fails_cleanly(saved, manifest):
    (saved / "icae_config.json").write_text(manifest)
    with pytest.raises(CorruptCheckpointError, match=r"not the object .* re-save"):
        ICAE.from_pretrained(saved)


def test_a_directory_without_manifest_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not an ICAE checkpoint"):
        ICAE.from_pretrained(tmp_path)


def test_no_default_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "DEFAULT_CHECKPOINT", tmp_path / "missing")
    with pytest.raises(NoDefaultCheckpointError, match="from_base"):
        ICAE.from_pretrained()


def test_resaving_over_a_checkpoint_replaces_it(make_icae, saved, tokenizer):
    make_icae(trained=False).save_pretrained(saved)
    loaded = ICAE.from_pretrained(saved, base_model=(tiny_icae_base(0), tokenizer))
    lora_b = [p for n, p in loaded.model.named_parameters() if "lora_B" in n]
    assert all(torch.count_nonzero(p) == 0 for p in lora_b)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "icae_embeddings.safetensors"])
def test_a_file_left_out_of_the_manifest_is_refused_not_trusted(saved, tokenizer, name):
    """Dropping a file's hash must not switch its check off: damage it, unlist it, refuse."""
    (saved / name).write_bytes((saved / name).read_bytes()[:-8] + b"\x00" * 8)
    manifest = json.loads((saved / "icae_config.json").read_text())
    del manifest["files"][name]
    (saved / "icae_config.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match=f"no SHA-256 for \\['{name}'\\]"):
        ICAE.from_pretrained(saved, base_model=(tiny_icae_base(0), tokenizer))


@pytest.mark.parametrize("name", ["../adapter_model.safetensors", "/etc/passwd", "sub/x", ".."])
def test_manifest_names_are_plain_file_names(saved, tokenizer, name):
    manifest = json.loads((saved / "icae_config.json").read_text())
    manifest["files"][name] = "0" * 64
    (saved / "icae_config.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="plain file names"):
        ICAE.from_pretrained(saved, base_model=(tiny_icae_base(0), tokenizer))


def test_a_decoder_adapter_must_be_listed_too(make_icae, tokenizer, tmp_path):
    saved = make_icae(decoder_lora_rank=4, trained=True).save_pretrained(tmp_path / "dec")
    manifest = json.loads((saved / "icae_config.json").read_text())
    del manifest["files"]["decoder_adapter.safetensors"]
    (saved / "icae_config.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="decoder_adapter"):
        ICAE.from_pretrained(saved, base_model=(tiny_icae_base(0), tokenizer))
