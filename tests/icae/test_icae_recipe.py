"""The ICAE recipe options: spread slot positions, the slot read-out layer and the slot head.

Each is checked against a hand-built reference on a tiny model, and checkpoints must carry them.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import TINY_ICAE_CONFIG, randomise_trained_tensors, tiny_icae

from icmem.icae import ICAE, ICAEConfig, ICAEConfigError, ICAEExample, MemorySlots
from icmem.icae.checkpoint import EMBEDDINGS, MANIFEST

SPAN = TINY_ICAE_CONFIG["span_tokens"]  # 32
K = TINY_ICAE_CONFIG["num_memory_tokens"]  # 8
SPREAD = {"slot_positions": "spread"}


def spans_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture
def make(tokenizer):
    def build(seed: int = 0, **overrides) -> ICAE:
        icae = tiny_icae(tokenizer, seed=seed, **overrides)
        randomise_trained_tensors(icae)
        return icae.eval()

    return build


def merged_inputs(icae: ICAE, span: list[int]) -> tuple[torch.nn.Module, torch.Tensor]:
    """A plain copy of the encoder (LoRA merged) and its ``[span][memory tokens]`` inputs."""
    merged = copy.deepcopy(icae.model).merge_and_unload()
    m = icae.config.slots_for(len(span))
    with torch.no_grad():
        embeds = torch.cat(
            [merged.get_input_embeddings()(torch.tensor(span)), icae.memory_embeddings[:m]]
        )[None]
    return merged, embeds


def causal_4d(length: int) -> torch.Tensor:
    """An additive causal mask: given as 4D, transformers uses it as is (no inference)."""
    blocked = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    return torch.zeros(1, 1, length, length).masked_fill(blocked, torch.finfo(torch.float32).min)


# ------------------------------------------------------------------------- positions


def test_spread_positions_sit_at_the_centre_of_the_tokens_each_slot_stands_for():
    config = ICAEConfig(slot_positions="spread")
    full = config.slot_positions_for(512, 128)
    assert full[:3] == [2, 6, 10] and full[-1] == 510  # tokens 4j+1..4j+4, centre 4j+2
    assert config.slot_positions_for(40, 10) == list(range(2, 40, 4))
    assert config.slot_positions_for(5, 2) == [1, 4]  # r = 2.5: floor(0.75), floor(3.25)
    assert config.slot_positions_for(5, 8)[0] == 1  # more slots than tokens: never before 1
    assert ICAEConfig().slot_positions_for(16, 4) == [16, 17, 18, 19]  # sequential: after


def test_decoder_positions_of_multi_span_memory(make):
    icae = make(**SPREAD)
    spans = [(32, 8), (5, 2)]
    first = list(range(2, 32, 4))  # span 1 covers 1..32
    second = [32 + 1, 32 + 4]  # span 2 covers 33..37
    assert icae.decoder_positions(spans, "ae", 3) == [*first, *second, 0, 1, 2, 3]
    # other tasks continue after the text: the special token at 37, what follows from 38
    assert icae.decoder_positions(spans, "ft", 3) == [*first, *second, 37, 38, 39, 40]
    assert make().decoder_positions(spans, "ae", 3) is None  # sequential: reading order


# ------------------------------------------------------------------------- encoder


def test_spread_encoder_matches_a_hand_built_reference(make):
    """Custom positions go with an explicit mask; a 4D mask is taken literally, so it is a
    reference that no packed-sequence inference can touch."""
    icae = make(**SPREAD)
    (span,) = spans_of([20], seed=1)
    merged, embeds = merged_inputs(icae, span)
    with torch.no_grad():
        positions = [*range(1, 21), *icae.config.slot_positions_for(20, embeds.shape[1] - 20)]
        hidden = merged.model(
            inputs_embeds=embeds,
            position_ids=torch.tensor([positions]),
            attention_mask=causal_4d(len(positions)),
        ).last_hidden_state[0]
        (slots,) = icae.compress([span])
    torch.testing.assert_close(slots.tensor, hidden[20:], rtol=1e-4, atol=1e-5)


def test_every_spread_slot_reads_the_first_token(make):
    """transformers reads a drop in position ids as the start of a new packed sequence when no
    mask is given; the slots (placed back at 2, 6, ...) would then not see the span at all."""
    icae = make(**SPREAD)
    (span,) = spans_of([SPAN], seed=2)
    changed = [span[0] + 1, *span[1:]]
    with torch.no_grad():
        a, b = (icae.compress([s])[0].tensor for s in (span, changed))
    assert bool(((a - b).abs().amax(-1) > 1e-4).all())


def test_spread_slots_do_not_depend_on_the_batch(make):
    icae = make(**SPREAD)
    spans = spans_of([32, 5, 17, 32, 9, 1], seed=3)  # different slot counts in one batch
    alone = icae.compress(spans, batch_size=1)
    together = icae.compress(spans, batch_size=6)
    for a, b in zip(alone, together, strict=True):
        assert a.num_slots == b.num_slots
        torch.testing.assert_close(a.tensor, b.tensor, rtol=1e-3, atol=1e-5)


def test_scale_head_delivers_slots_at_token_embedding_scale(tokenizer):
    icae = tiny_icae(tokenizer, slot_head="scale")  # untrained: gain at its initial value
    table = icae.model.get_input_embeddings().weight.detach()
    (slots,) = icae.compress(spans_of([SPAN], seed=4))
    rms = slots.tensor.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, float(table.pow(2).mean().sqrt())))


def test_affine_head_is_the_scale_head_until_trained(tokenizer):
    spans = spans_of([SPAN, 7], seed=5)
    scale = tiny_icae(tokenizer, slot_head="scale").compress(spans)
    affine = tiny_icae(tokenizer, slot_head="affine").compress(spans)
    for a, b in zip(scale, affine, strict=True):
        torch.testing.assert_close(a.tensor, b.tensor, rtol=1e-5, atol=1e-6)


def test_slot_layer_reads_that_layers_residual_stream(make):
    icae = make(slot_layer=1)
    (span,) = spans_of([12], seed=6)
    merged, embeds = merged_inputs(icae, span)
    with torch.no_grad():
        states = merged.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        (slots,) = icae.compress([span])
    # hidden_states[0] is the embeddings, [1] the stream after layer 1, [-1] the normed output
    torch.testing.assert_close(slots.tensor, states[1][0, 12:], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(slots.tensor, states[-1][0, 12:], atol=1e-3)


def test_the_decoder_runs_every_layer_when_slots_come_from_a_middle_one(make):
    early, full = make(slot_layer=1), make()  # same seed: same base weights
    embeds = torch.randn(1, 10, early.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(early.decoder_logits(embeds), full.decoder_logits(embeds))


def test_slot_layer_must_lie_inside_the_model(tokenizer):
    with pytest.raises(ICAEConfigError, match="has 2 layers"):
        tiny_icae(tokenizer, slot_layer=2)


@pytest.mark.parametrize(
    "bad",
    [
        {"slot_positions": "diagonal"},
        {"slot_head": "mlp"},
        {"slot_layer": 0},
        {"slot_layer": True},
        {"slot_layer": 1.5},
        {"decoder_lora_rank": -1},
        {"slot_residual": "sum"},
    ],
)
def test_bad_recipe_values_are_refused(bad):
    (name,) = bad
    with pytest.raises(ICAEConfigError, match=name):
        ICAEConfig(**bad)


# ------------------------------------------------------------------------- decoder


def test_spread_training_loss_is_the_hand_computed_cross_entropy(make):
    icae = make(**SPREAD)
    (span,) = spans_of([24], seed=7)
    loss = icae.training_loss([ICAEExample(context_ids=span, task="ae", target_ids=span)])
    (slots,) = icae.compress([span])
    target = [*span, icae.tokenizer.eos_token_id]
    with torch.no_grad():
        prefix = icae.decoder_inputs([slots], "ae", [])
        embeds = torch.cat([prefix, icae.model.get_input_embeddings()(torch.tensor(target))])
        positions = icae.decoder_positions([(24, slots.num_slots)], "ae", len(target))
        logits = icae.decoder_logits(embeds[None], positions)[0]
    expected = torch.nn.functional.cross_entropy(
        logits[prefix.shape[0] - 1 : -1], torch.tensor(target)
    )
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    # and the layout matters: read in plain order, the same inputs give another loss
    with torch.no_grad():
        plain = icae.decoder_logits(embeds[None])[0]
    assert (plain - logits).abs().max() > 1e-3


@pytest.mark.parametrize("task", ["ae", "lm"])
def test_spread_generation_equals_a_cache_free_greedy_loop(make, task):
    icae = make(**SPREAD)
    memory = icae.compress(spans_of([32, 9], seed=8))
    prompt = "" if task == "ae" else "The quick"
    prompt_ids = icae.tokenize(prompt)
    got = icae.tokenize(icae.generate(memory, prompt, task=task, max_new_tokens=12))
    with torch.no_grad():
        embeds = icae.decoder_inputs(memory, task, prompt_ids)
        spans = [(s.token_count, s.num_slots) for s in memory]
        expected: list[int] = []
        for _ in range(12):
            positions = icae.decoder_positions(spans, task, len(prompt_ids) + len(expected))
            logits = icae.decoder_logits(embeds[None], positions)[0, -1]
            token = int(logits.argmax())
            if token == icae.tokenizer.eos_token_id:
                break
            expected.append(token)
            embeds = torch.cat([embeds, icae.model.get_input_embeddings()(torch.tensor([token]))])
    assert got == icae.tokenize(icae.tokenizer.decode(expected, skip_special_tokens=True))


def test_spread_memory_without_a_token_count_is_refused(make):
    icae = make(**SPREAD)
    (slots,) = icae.compress(spans_of([16], seed=9))
    blind = MemorySlots(slots.tensor, None, None, slots.fingerprint)
    with pytest.raises(ICAEConfigError, match="token_count"):
        icae.generate([blind], "hi", max_new_tokens=2)


# ------------------------------------------------------------------------- checkpoints


def test_a_recipe_survives_a_checkpoint_round_trip(make, tokenizer, tmp_path):
    from tiny_models import tiny_icae_base

    recipe = {"slot_positions": "spread", "slot_head": "affine", "slot_layer": 1}
    icae = make(**recipe)
    icae.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / EMBEDDINGS)) == {
        "memory_embeddings",
        "special_embeddings",
        "slot_gain",
        "slot_proj.weight",
        "slot_proj.bias",
    }
    loaded = ICAE.from_pretrained(tmp_path, base_model=(tiny_icae_base(0), tokenizer))
    assert loaded.config == icae.config
    spans = spans_of([32, 11], seed=10)
    for a, b in zip(icae.compress(spans), loaded.compress(spans), strict=True):
        torch.testing.assert_close(a.tensor, b.tensor)


def test_the_first_shipped_config_reads_as_the_first_recipe():
    """Configs written before the recipe options existed keep their behaviour: this is the
    first shipped checkpoint's config, as its icae_config.json held it."""
    first = {
        "base_model": "smollm2-135m-instruct",
        "base_revision": None,
        "num_memory_tokens": 128,
        "span_tokens": 512,
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lora_targets": [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        "special_tokens": ["ae", "lm", "ft"],
        "dtype": "bfloat16",
        "short_span_policy": "proportional",
        "min_memory_tokens": 8,
    }
    config = ICAEConfig.from_dict(first)
    recipe = (
        config.slot_positions,
        config.slot_head,
        config.slot_layer,
        config.slot_residual,
        config.decoder_lora_rank,
    )
    assert recipe == ("sequential", "none", None, "none", 0)


# ------------------------------------------------------------------------- pooled residual


def test_slot_groups_cover_the_span_in_order():
    config = ICAEConfig()
    assert config.slot_groups(8, 2) == [(0, 4), (4, 8)]
    assert config.slot_groups(5, 2) == [(0, 2), (2, 5)]
    assert config.slot_groups(2, 4) == [(0, 1), (0, 1), (1, 2), (1, 2)]  # one token at least


def test_pooled_slots_add_the_mean_embedding_of_each_group(tokenizer):
    recipe = {"slot_positions": "spread", "slot_head": "scale"}
    plain = tiny_icae(tokenizer, **recipe)
    pooled = tiny_icae(tokenizer, **recipe, slot_residual="pooled")
    with torch.no_grad():
        pooled.slot_gain.copy_(plain.slot_gain)  # the pooled recipe starts its gain lower
    (span,) = spans_of([13], seed=11)
    (a,) = plain.compress([span])
    (b,) = pooled.compress([span])
    embeds = plain.model.get_input_embeddings().weight.detach()[torch.tensor(span)]
    means = torch.stack([embeds[i:j].mean(0) for i, j in plain.config.slot_groups(13, a.num_slots)])
    torch.testing.assert_close(b.tensor, a.tensor + means, rtol=1e-4, atol=1e-5)


def test_pooled_residual_needs_slots_at_token_scale():
    with pytest.raises(ICAEConfigError, match="slot_head"):
        ICAEConfig(slot_residual="pooled")


# ------------------------------------------------------------------------- decoder adapter


def test_the_decoder_adapter_reads_memory_and_leaves_the_base_model_alone(make, tokenizer):
    from tiny_models import tiny_icae_base

    icae = make(decoder_lora_rank=4)
    frozen = make()  # same seed: same base weights, same encoder adapter, no decoder adapter
    embeds = torch.randn(1, 10, icae.hidden_size)
    with torch.no_grad():
        assert not torch.allclose(icae.decoder_logits(embeds), frozen.decoder_logits(embeds))
        ids = torch.tensor([spans_of([12], seed=12)[0]])
        with icae.model.disable_adapter():  # what the no-memory prior and raw answers read
            plain = icae.model(input_ids=ids).logits
        torch.testing.assert_close(plain, tiny_icae_base(0)(input_ids=ids).logits)
    # decoding switched the decoder adapter on and off again: the encoder is untouched
    spans = spans_of([20], seed=13)
    before = training_path_slots(icae, spans)
    icae.generate(icae.compress(spans), "hi", max_new_tokens=3)
    torch.testing.assert_close(training_path_slots(icae, spans), before)


def training_path_slots(icae, spans):
    with torch.enable_grad():
        return icae._encode_spans(spans)[0].detach()


def test_training_reaches_both_adapters(make):
    icae = make(decoder_lora_rank=4).train()
    (span,) = spans_of([24], seed=14)
    icae.training_loss([ICAEExample(context_ids=span, task="ae", target_ids=span)]).backward()
    grads = {"default": 0.0, "decoder": 0.0}
    for name, param in icae.model.named_parameters():
        for adapter in grads:
            if f".{adapter}." in name and param.grad is not None:
                grads[adapter] += float(param.grad.abs().sum())
    assert grads["default"] > 0 and grads["decoder"] > 0


def test_the_decoder_adapter_survives_a_checkpoint(make, tokenizer, tmp_path):
    from tiny_models import tiny_icae_base

    icae = make(decoder_lora_rank=4, slot_positions="spread")
    icae.save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert "decoder_adapter.safetensors" in manifest["files"]
    loaded = ICAE.from_pretrained(tmp_path, base_model=(tiny_icae_base(0), tokenizer))
    memory = icae.compress(spans_of([32], seed=15))
    assert loaded.generate(memory, "The", max_new_tokens=8) == icae.generate(
        memory, "The", max_new_tokens=8
    )
    embeds = torch.randn(1, 6, icae.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decoder_logits(embeds), icae.decoder_logits(embeds))
