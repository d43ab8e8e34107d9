"""Reconstruction metrics against references, and the evaluation on a tiny ICAE."""

from __future__ import annotations

import json
import math

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_icae_base

from icmem.cli import build_parser
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
    args = build_parser().parse_args(
        ["eval", "reconstruct", "--text", "held.txt", "--json", "--k", "32", "128"]
    )
    assert args.checkpoint is None and args.text == "held.txt" and args.json
    assert args.k == [32, 128] and args.lengths == [64, 128, 256, 512]


# --------------------------------------------------------------------------- known values
# The tests below pin exact numbers worked out by hand. Range checks alone let mutants through
# (the median swapped for the max, 1 minus the prefix ratio, the prior read with the wrong
# context), because random tiny ICAEs reconstruct nothing and every BLEU was 0.0.


@pytest.mark.parametrize(
    ("hypothesis", "reference", "expected"),
    [
        # One wrong last token, equal lengths (brevity penalty 1). Matches / n-grams per order:
        # 7/8, 6/7, 5/6, 4/5; their product telescopes to 4/8, so BLEU = (1/2) ** (1/4).
        ([1, 2, 3, 4, 5, 6, 7, 9], [1, 2, 3, 4, 5, 6, 7, 8], 0.5**0.25),
        # A 6-token prefix of an 8-token reference: every precision is 1, so BLEU is the
        # brevity penalty alone, exp(1 - 8/6) = exp(-1/3).
        ([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8], math.exp(-1 / 3)),
        # Two extra tokens: no penalty for length (a longer hypothesis pays in precision
        # instead): 8/10 * 7/9 * 6/8 * 5/7 = 1/3, so BLEU = (1/3) ** (1/4).
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8], (1 / 3) ** 0.25),
        # Zero-match orders are smoothed: 1-grams 4/4; 2-grams 0 of 3 -> 1/(2*3);
        # 3-grams 0 of 2 -> 1/(4*2); 4-grams 0 of 1 -> 1/(8*1). BLEU = (1/384) ** (1/4).
        ([1, 3, 2, 4], [1, 2, 3, 4], (1 / 384) ** 0.25),
        # Too short for 4-grams, so the mean runs over orders 1-3 only (effective order):
        # 1-grams 3/3; 2-grams (1,2) of (1,2),(2,4) -> 1/2; 3-grams 0 of 1 -> 1/(2*1). Times
        # the brevity penalty exp(1 - 4/3): BLEU = exp(-1/3) * (1/4) ** (1/3).
        ([1, 2, 4], [1, 2, 3, 4], math.exp(-1 / 3) * 0.25 ** (1 / 3)),
    ],
    ids=["one-wrong-token", "brevity-penalty", "longer", "smoothed", "effective-order"],
)
def test_bleu4_hand_computed_values(hypothesis, reference, expected):
    assert bleu4(hypothesis, reference) == pytest.approx(expected, rel=1e-12)


def test_exact_prefix_ratio_is_the_share_right_before_the_first_error():
    """3 of 4 tokens right before the first mistake is 0.75 (a `1 - ratio` mutant gives 0.25);
    tokens after the first mistake do not count even when they match."""
    assert exact_prefix_ratio([1, 2, 3, 9], [1, 2, 3, 4]) == 0.75
    assert exact_prefix_ratio([1, 9, 3, 4], [1, 2, 3, 4]) == 0.25
    assert exact_prefix_ratio([1, 2, 3, 4, 5, 6, 7, 8, 9, 0], list(range(1, 11))) == 0.9


DOCUMENT = (
    "Alice met Bob in London on a quiet day in March; the quick brown fox jumps over the lazy dog. "
) * 4
LENGTH, K, CONTINUATION = 24, 4, 2


def _spans_of_one_document(icae, count: int) -> list[list[int]]:
    """The spans `evaluate_reconstruction` reads from one document, by hand: consecutive
    windows of LENGTH + CONTINUATION tokens, of which the first LENGTH are the span."""
    ids = icae.tokenize(DOCUMENT)
    window = LENGTH + CONTINUATION
    return [ids[i * window : i * window + LENGTH] for i in range(count)]


def test_bucket_reports_the_median_bleu_and_mean_exact_prefix(make_icae, monkeypatch):
    """Three spans reconstructed (by a stand-in for the decoder) as: the exact text (BLEU 1,
    prefix 1), nothing (BLEU 0, prefix 0), and its first 18 of 24 tokens (BLEU = brevity
    penalty exp(1 - 24/18) = exp(-1/3) ~ 0.717, prefix 0.75). The median is the last one; the
    mean (~0.572) or the max (1.0) would differ, and so would a mean prefix of 1 - ratio."""
    icae = make_icae()
    tokenizer = icae.tokenizer
    spans = _spans_of_one_document(icae, 3)
    references = [icae.tokenize(tokenizer.decode(span)) for span in spans]
    part = 18
    texts = [tokenizer.decode(references[0]), "", tokenizer.decode(references[2][:part])]
    assert icae.tokenize(texts[2]) == references[2][:part]  # the cut survives re-tokenizing
    with torch.no_grad():
        encoded = [_encode(icae, span, K).tensor for span in spans]

    def reconstruct(memory, *, max_new_tokens=None):
        (slots,) = memory
        (index,) = [i for i, t in enumerate(encoded) if torch.equal(t, slots.tensor)]
        return texts[index]

    monkeypatch.setattr(icae, "reconstruct", reconstruct)
    result = evaluate_reconstruction(
        icae, [DOCUMENT], lengths=(LENGTH,), ks=(K,), spans_per_length=3,
        continuation_tokens=CONTINUATION,
    )  # fmt: skip
    (bucket,) = result["reconstruction"]
    partial = math.exp(1 - LENGTH / part)
    assert bucket["spans"] == 3
    assert bucket["bleu4_median"] == pytest.approx(partial, rel=1e-9)
    assert bucket["bleu4_mean"] == pytest.approx((1.0 + 0.0 + partial) / 3, rel=1e-9)
    assert bucket["exact_prefix_mean"] == pytest.approx((1.0 + 0.0 + part / LENGTH) / 3)


def test_prior_is_the_base_model_reading_each_span_from_its_first_token(make_icae):
    """`prior_ce` is what the span costs with no memory: the bare base model's mean
    cross-entropy of span[1:] given span[:1] (teacher forcing), averaged over spans. It is
    recomputed here on an untouched copy of the base model; the ICAE's LoRA is randomised so
    that reading the prior with the adapter on, or with any other context, gives another
    number."""
    icae = make_icae()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in icae.model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    spans = _spans_of_one_document(icae, 2)
    base = tiny_icae_base(0)

    def base_ce(span: list[int]) -> float:
        logits = base(input_ids=torch.tensor([span])).logits[0]  # row i predicts token i + 1
        return float(F.cross_entropy(logits[:-1], torch.tensor(span[1:])))

    with torch.no_grad():
        by_hand = [base_ce(span) for span in spans]
    result = evaluate_reconstruction(
        icae, [DOCUMENT], lengths=(LENGTH,), ks=(K,), spans_per_length=2,
        continuation_tokens=CONTINUATION, generate=False,
    )  # fmt: skip
    (bucket,) = result["reconstruction"]
    assert bucket["spans"] == 2
    assert bucket["prior_ce"] == pytest.approx(sum(by_hand) / 2, rel=1e-5)
