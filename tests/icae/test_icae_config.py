"""ICAEConfig: validation, the short-span policy, and the JSON round trip."""

from __future__ import annotations

import json

import pytest

from icmem.icae import ICAEConfig, ICAEConfigError


def test_defaults_follow_the_paper_ratio():
    config = ICAEConfig()
    assert (config.num_memory_tokens, config.span_tokens) == (128, 512)
    assert config.compression_ratio == 4.0
    assert config.lora_targets == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    ("tokens", "slots"), [(512, 128), (511, 128), (400, 100), (40, 10), (33, 9), (20, 8), (1, 8)]
)
def test_proportional_policy_gives_ceil_of_ratio_with_a_floor(tokens, slots):
    assert ICAEConfig().slots_for(tokens) == slots


def test_fixed_policy_always_spends_k():
    config = ICAEConfig(short_span_policy="fixed")
    assert config.slots_for(40) == config.slots_for(512) == 128


@pytest.mark.parametrize("tokens", [0, 513])
def test_slots_for_refuses_lengths_outside_a_span(tokens):
    with pytest.raises(ICAEConfigError, match="span"):
        ICAEConfig().slots_for(tokens)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_memory_tokens": 600}, "exceeds span_tokens"),
        ({"num_memory_tokens": 0}, "positive integer"),
        ({"min_memory_tokens": 200}, "floor"),
        ({"dtype": "float16"}, "dtype"),
        ({"short_span_policy": "greedy"}, "short_span_policy"),
        ({"special_tokens": ("ae", "lm")}, "lacks"),
        ({"special_tokens": ("ae", "lm", "ft", "ft")}, "duplicates"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_targets": ()}, "lora_targets"),
        ({"base_model": ""}, "base_model"),
    ],
)
def test_invalid_configs_are_refused_with_the_field_named(overrides, message):
    with pytest.raises(ICAEConfigError, match=message):
        ICAEConfig(**overrides)


def test_dict_round_trip_through_json():
    config = ICAEConfig(base_model="some/model", lora_targets=("q_proj", "k_proj"), lora_rank=8)
    assert ICAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_from_dict_names_unknown_keys():
    with pytest.raises(ICAEConfigError, match="memory_size"):
        ICAEConfig.from_dict({"memory_size": 3})
