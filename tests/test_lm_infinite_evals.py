"""Long-context evaluations on a tiny model: known answers, chunking invariance, CLI wiring."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import tiny_model

from icmem import lm_infinite
from icmem.cli import build_parser
from icmem.evals import long_context
from icmem.evals.long_context import (
    EvaluationError,
    passkey_accuracy,
    passkey_prompt,
    perplexity_by_bucket,
)

TEXT = "Paris is the capital of France; Berlin is the capital of Germany. " * 40


@pytest.fixture
def model():
    return tiny_model("llama", heads=4, kv_heads=2, max_positions=32)


def direct_bucket_ppl(model, tokenizer, tokens, bucket):
    """One uncached full forward: the textbook definition to compare against."""
    ids = tokenizer(TEXT, return_tensors="pt", add_special_tokens=False).input_ids[:, :tokens]
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    positions = torch.arange(1, tokens)
    return [
        math.exp(float(nll[(positions >= low) & (positions < low + bucket)].mean()))
        for low in range(0, tokens, bucket)
    ]


def test_vanilla_perplexity_matches_direct_computation(model, tokenizer):
    result = perplexity_by_bucket(
        model, tokenizer, TEXT, tokens=50, bucket=16, chunk=7, lm_infinite=False, progress=False
    )
    assert result["mode"] == "vanilla"
    assert [(b["start"], b["end"], b["count"]) for b in result["buckets"]] == [
        (0, 16, 15),
        (16, 32, 16),
        (32, 48, 16),
        (48, 50, 2),
    ]
    expected = direct_bucket_ppl(model, tokenizer, 50, 16)
    assert [b["ppl"] for b in result["buckets"]] == pytest.approx(expected, rel=1e-4)


def test_lm_infinite_perplexity_is_chunk_invariant_and_leaves_model_as_it_was(model, tokenizer):
    runs = [
        perplexity_by_bucket(
            model, tokenizer, TEXT, tokens=90, bucket=30, chunk=chunk, progress=False
        )
        for chunk in (5, 90)
    ]
    assert runs[0]["mode"] == "lm_infinite" and runs[0]["local_window"] == 32
    assert [b["ppl"] for b in runs[0]["buckets"]] == pytest.approx(
        [b["ppl"] for b in runs[1]["buckets"]], rel=1e-4
    )
    assert not lm_infinite.is_enabled(model)
    # Inside the window LM-Infinite is stock attention, so the first bucket agrees with vanilla.
    assert runs[0]["buckets"][0]["ppl"] == pytest.approx(
        direct_bucket_ppl(model, tokenizer, 90, 30)[0], rel=1e-4
    )


def test_perplexity_rejects_text_too_short(model, tokenizer):
    with pytest.raises(EvaluationError, match="only"):
        perplexity_by_bucket(model, tokenizer, "short", tokens=1000, progress=False)


def test_vanilla_baseline_refuses_a_model_with_lm_infinite_on(model, tokenizer):
    with lm_infinite.enabled(model), pytest.raises(EvaluationError, match="disable"):
        perplexity_by_bucket(model, tokenizer, TEXT, tokens=10, lm_infinite=False, progress=False)


def test_passkey_prompt_places_needle_at_depth(tokenizer):
    starts = []
    for depth in (0.0, 0.5, 1.0):
        prompt, needle_at = passkey_prompt(tokenizer, tokens=2000, depth=depth, key="73915")
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert 1900 <= len(ids) <= 2000
        assert prompt.count("73915") == 2
        assert tokenizer.decode(ids[needle_at:]).startswith("The pass key is 73915")
        starts.append(needle_at)
    intro = len(tokenizer(long_context._PASSKEY_INTRO, add_special_tokens=False).input_ids)
    assert starts[0] == intro  # depth 0: right after the instructions
    filler = len(tokenizer(long_context._PASSKEY_FILLER, add_special_tokens=False).input_ids)
    assert starts[1] - starts[0] == pytest.approx((starts[2] - starts[0]) / 2, abs=filler)
    tail = prompt[prompt.index("The pass key") :]
    needle = long_context._PASSKEY_NEEDLE.format(key="73915")
    assert tail == needle + long_context._PASSKEY_QUESTION  # depth 1: right before the question


def test_passkey_prompt_rejects_depth_outside_unit_interval(tokenizer):
    with pytest.raises(EvaluationError, match="depth"):
        passkey_prompt(tokenizer, tokens=100, depth=1.5, key="1")


def test_passkey_accuracy_reports_which_depths_the_window_sees(model, tokenizer):
    result = passkey_accuracy(
        model,
        tokenizer,
        tokens=300,
        depths=(0.0, 1.0),
        trials=2,
        progress=False,
        chunk=33,
        local_window=100,
    )
    assert result["mode"] == "lm_infinite" and result["tokens"] == 300
    assert [d["depth"] for d in result["depths"]] == [0.0, 1.0]
    assert [d["trials"] for d in result["depths"]] == [2, 2]
    assert [d["in_window"] for d in result["depths"]] == [False, True]
    assert all(0.0 <= d["accuracy"] <= 1.0 for d in result["depths"])
    assert not lm_infinite.is_enabled(model)


@pytest.mark.parametrize(("echo", "accuracy"), [(slice(None), 1.0), (slice(0, 10), 0.0)])
def test_passkey_scores_whether_the_answer_holds_the_key(tokenizer, monkeypatch, echo, accuracy):
    """A stand-in decoder that answers with part of its prompt: the whole prompt holds the key,
    its first ten tokens (the instructions) do not."""
    from contextlib import nullcontext

    from icmem.icae import batch_decode

    class Echo:
        device = torch.device("cpu")

    def echo_decode(model, ids, **kwargs):
        return [batch_decode.Decoded(ids[0, echo].tolist(), "length")]

    monkeypatch.setattr(batch_decode, "decode_batch", echo_decode)
    monkeypatch.setattr(batch_decode, "stop_token_ids", lambda model: frozenset())
    monkeypatch.setattr(long_context, "_attention_context", lambda *args: nullcontext())
    monkeypatch.setattr(long_context, "_new_cache", lambda *args: None)
    result = passkey_accuracy(
        Echo(), tokenizer, tokens=120, depths=(0.5,), trials=3, lm_infinite=False, progress=False
    )
    assert result["accuracy"] == accuracy


def test_cli_prints_json_for_both_evaluations(model, tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("icmem.models.load_model", lambda name: (model, tokenizer))
    parser = build_parser()
    text = tmp_path / "play.txt"
    text.write_text(TEXT, encoding="utf-8")

    args = parser.parse_args(
        ["eval", "ppl", "--text", str(text), "--tokens", "64", "--bucket", "32", "--json"]
    )
    assert args.func(args) == 0
    ppl = json.loads(capsys.readouterr().out)
    assert ppl["mode"] == "lm_infinite" and len(ppl["buckets"]) == 2
    assert ppl["summary"]["split"] == 32  # the tiny model's pretraining length
    expected = ppl["buckets"][1]["ppl"] / ppl["buckets"][0]["ppl"] - 1
    assert ppl["summary"]["deviation_past"] == pytest.approx([expected])

    args = parser.parse_args(
        [
            "eval",
            "passkey",
            "--tokens",
            "120",
            "--depths",
            "0,1",
            "--trials",
            "1",
            "--vanilla",
            "--json",
        ]
    )
    assert args.func(args) == 0
    passkey = json.loads(capsys.readouterr().out)
    assert passkey["mode"] == "vanilla" and len(passkey["depths"]) == 2


def test_cli_rejects_bad_depths():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "passkey", "--tokens", "10", "--depths", "half"])


def test_bucket_summary_measures_deviation_past_the_split():
    buckets = [
        {"start": 0, "end": 8, "ppl": 30.0},
        {"start": 8, "end": 16, "ppl": 34.0},  # mean below 16: 32
        {"start": 16, "end": 24, "ppl": 33.6},  # +5%
        {"start": 24, "end": 32, "ppl": 27.2},  # -15%
    ]
    summary = long_context.bucket_summary(buckets, split=16)
    assert summary["mean_below"] == pytest.approx(32.0)
    assert summary["deviation_past"] == pytest.approx([0.05, -0.15])
    assert summary["worst_deviation_past"] == pytest.approx(0.15)
    assert summary["within_10_percent"] is False
    assert long_context.bucket_summary(buckets[:3], split=16)["within_10_percent"] is True
    assert "worst_deviation_past" not in long_context.bucket_summary(buckets[:2], split=16)
