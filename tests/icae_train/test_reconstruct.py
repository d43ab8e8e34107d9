"""Reconstruction metrics against references, and the evaluation on a tiny ICAE."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import sacrebleu
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icmem.evals.reconstruct import (
    EvaluationError,
    _encode,
    _raw_nll,
    _target_nll,
    answer_agreement,
    bleu4,
    evaluate_reconstruction,
    exact_prefix_ratio,
    format_table,
    register_cli,
    sample_spans,
)
from icmem.icae.data import Triple
from icmem.icae.model import ICAEExample

tokens = st.lists(st.integers(0, 6), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(hypothesis=tokens, reference=tokens)
def test_bleu4_matches_sacrebleu_sentence_bleu(hypothesis, reference):
    expected = sacrebleu.sentence_bleu(
        " ".join(map(str, hypothesis)), [" ".join(map(str, reference))], tokenize="none"
    ).score
    assert bleu4(hypothesis, reference) == pytest.approx(expected / 100, abs=1e-9)


def test_bleu4_known_values():
    ref = list(range(20))
    assert bleu4(ref, ref) == 1.0
    assert bleu4([], ref) == 0.0
    assert bleu4([99] * 20, ref) == 0.0
    half = ref[:10]  # perfect precision, brevity penalty exp(1 - 20/10)
    assert bleu4(half, ref) == pytest.approx(math.exp(-1))
    with pytest.raises(EvaluationError):
        bleu4(ref, [])


def test_exact_prefix_ratio():
    assert exact_prefix_ratio([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert exact_prefix_ratio([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5
    assert exact_prefix_ratio([1, 2], [1, 2, 3, 4]) == 0.5
    assert exact_prefix_ratio([1, 2, 3, 4, 5], [1, 2, 3, 4]) == 1.0
    assert exact_prefix_ratio([7], [1, 2]) == 0.0


def test_answer_agreement():
    assert answer_agreement("Paris.", "paris") == (1.0, True)
    f1, same = answer_agreement("the capital is Paris", "Paris")
    assert f1 == pytest.approx(2 * 0.25 * 1 / 1.25) and not same
    assert answer_agreement("London", "Paris") == (0.0, False)


def test_sample_spans_are_disjoint_windows_taken_round_robin():
    docs = [list(range(0, 100)), list(range(1000, 1030)), list(range(2000, 2100))]
    pairs = sample_spans(docs, length=20, count=5, continuation=5)
    assert [p[0][0] for p in pairs] == [0, 1000, 2000, 25, 2025]
    for span, cont in pairs:
        assert len(span) == 20 and cont == list(range(span[-1] + 1, span[-1] + 6))
    assert len(sample_spans(docs, length=20, count=50, continuation=5)) == 4 + 1 + 4


def test_teacher_forced_loss_matches_training_loss(make_icae, tokenizer):
    icae = make_icae().eval()
    text = "Alice met Bob in London; Paris is the capital of France. " * 2
    span = icae.tokenize(text)[:24]
    memory = _encode(icae, span, icae.config.slots_for(len(span)))
    with torch.no_grad():
        ours = _target_nll(icae, memory, "ae", [*span, tokenizer.eos_token_id])
        theirs = float(icae.training_loss([ICAEExample(span, "ae", span)]))
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_raw_continuation_loss_matches_the_base_model(make_icae):
    icae = make_icae()
    ids = icae.tokenize("The quick brown fox jumps over the lazy dog. " * 3)[:30]
    with torch.no_grad(), icae.model.disable_adapter():
        labels = torch.tensor([[-100] * 20 + ids[20:]])
        expected = float(icae.model(input_ids=torch.tensor([ids]), labels=labels).loss)
        assert _raw_nll(icae, ids[:20], ids[20:]) == pytest.approx(expected, rel=1e-5)


def test_evaluate_reconstruction_reports_every_bucket_and_k(make_icae, tokenizer):
    icae = make_icae()
    texts = ["Alice met Bob in London on a quiet day in March. " * 6, "Tokyo 0123456789. " * 12]
    triples = [Triple(texts[0][:120], "Who met Bob?", "Alice")]
    result = evaluate_reconstruction(
        icae,
        texts,
        lengths=(8, 16),
        ks=(2, 8),
        spans_per_length=2,
        continuation_tokens=4,
        qa_triples=triples,
        qa_max_new_tokens=4,
    )
    json.dumps(result)
    assert [(b["length"], b["k"]) for b in result["reconstruction"]] == [
        (8, 2), (8, 8), (16, 2), (16, 8),
    ]  # fmt: skip
    for bucket in result["reconstruction"]:
        assert bucket["spans"] == 2
        assert 0.0 <= bucket["bleu4_median"] <= 1.0
        assert 0.0 <= bucket["exact_prefix_mean"] <= 1.0
        assert bucket["token_ce"] > 0 and bucket["prior_ce"] > 0
    for cont in result["continuation"]:
        assert cont["ratio"] == pytest.approx(cont["ppl_slots"] / cont["ppl_raw"])
    assert result["qa"]["triples"] == 1 and 0.0 <= result["qa"]["f1_mean"] <= 1.0
    assert "BLEU-4" in format_table(result)
    own = evaluate_reconstruction(icae, texts, lengths=(16,), spans_per_length=1, generate=False)
    assert own["reconstruction"][0]["k"] == icae.config.slots_for(16)
    assert own["reconstruction"][0]["bleu4_median"] is None


def test_evaluate_reconstruction_errors(make_icae):
    icae = make_icae()
    with pytest.raises(EvaluationError, match="span_tokens=32"):
        evaluate_reconstruction(icae, ["x"], lengths=(64,))
    with pytest.raises(EvaluationError, match=r"1\.\.8"):
        evaluate_reconstruction(icae, ["x"], lengths=(16,), ks=(9,))
    with pytest.raises(EvaluationError, match="longer held-out text"):
        evaluate_reconstruction(icae, ["short"], lengths=(16,), generate=False)


def test_cli_parses_eval_reconstruct():
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["reconstruct", "--text", "held.txt", "--json", "--k", "32", "128"])
    assert args.checkpoint is None and args.text == "held.txt" and args.json
    assert args.k == [32, 128] and args.lengths == [64, 128, 256, 512]
