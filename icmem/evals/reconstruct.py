"""What an ICAE's memory keeps: reconstruction, continuation and QA from slots.

- `[AE]` reconstruction per span length and slot count k: BLEU-4 and exact-match prefix ratio of
  the greedy reconstruction, and teacher-forced token cross-entropy of the original span, beside
  the base model's cross-entropy of the same span read with no memory at all (`prior_ce`): only
  the gap between the two is information the slots carry.
- Continuation (the paper's Table 1): perplexity of the text after a span given its slots,
  against given the raw span (decoder = the frozen base model in both cases).
- QA agreement: the answer from slots against the base model's answer reading the raw context.

Scores are on token ids: a reconstruction is re-tokenized and compared with the re-tokenized
reference text, so both pass through the same text-to-ids path.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmem.errors import IcmemError
from icmem.icae.data import decode_text

if TYPE_CHECKING:
    import torch

    from icmem.icae.data import Triple
    from icmem.icae.model import ICAE
    from icmem.icae.slots import MemorySlots

DEFAULT_LENGTHS = (64, 128, 256, 512)
DEFAULT_SPANS_PER_LENGTH = 8
DEFAULT_CONTINUATION_TOKENS = 128
DEFAULT_QA_MAX_NEW_TOKENS = 64


class EvaluationError(IcmemError, ValueError):
    """An evaluation was asked for something the data or model cannot give."""


# --------------------------------------------------------------------------- text metrics


def bleu4(hypothesis: Sequence[Any], reference: Sequence[Any]) -> float:
    """Sentence BLEU-4 in [0, 1] over token sequences.

    Uniform weights over 1..4-grams, brevity penalty, and the two rules sacrebleu's
    `sentence_bleu` applies so that short or imperfect sentences still score: orders with
    zero matches get precision 1 / (2^j * total) for the j-th such order ("exp" smoothing),
    and orders that the hypothesis is too short to contain are left out (effective order).
    """
    if not reference:
        raise EvaluationError("BLEU needs a non-empty reference")
    if not hypothesis:
        return 0.0
    log_precisions = []
    zero_orders = 0
    any_match = False
    for n in range(1, 5):
        hyp_ngrams = _ngrams(hypothesis, n)
        total = sum(hyp_ngrams.values())
        if total == 0:
            break
        correct = sum((hyp_ngrams & _ngrams(reference, n)).values())
        any_match = any_match or correct > 0
        if correct == 0:
            zero_orders += 1
            precision = 1.0 / (2**zero_orders * total)
        else:
            precision = correct / total
        log_precisions.append(math.log(precision))
    if not any_match:
        return 0.0
    brevity = min(1.0, math.exp(1 - len(reference) / len(hypothesis)))
    return brevity * math.exp(sum(log_precisions) / len(log_precisions))


def exact_prefix_ratio(hypothesis: Sequence[Any], reference: Sequence[Any]) -> float:
    """Share of the reference reproduced exactly before the first mistake."""
    if not reference:
        raise EvaluationError("exact-match prefix needs a non-empty reference")
    same = 0
    for h, r in zip(hypothesis, reference, strict=False):
        if h != r:
            break
        same += 1
    return same / len(reference)


def answer_agreement(answer: str, reference: str) -> tuple[float, bool]:
    """(token F1, exact match) of two answers after lower-casing and dropping punctuation."""
    a, b = _words(answer), _words(reference)
    if not a and not b:
        return 1.0, True
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0, False
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall), a == b


def _ngrams(tokens: Sequence[Any], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


# --------------------------------------------------------------------------- spans


def sample_spans(
    documents: Sequence[Sequence[int]], length: int, count: int, continuation: int = 0
) -> list[tuple[list[int], list[int]]]:
    """Up to `count` (span, continuation) pairs of exactly `length` (+ `continuation`) tokens.

    Spans are consecutive, non-overlapping windows taken document by document in turn (one
    from each before a second from any), so a few long documents do not supply them all.
    """
    window = length + continuation
    cursors = [0] * len(documents)
    pairs: list[tuple[list[int], list[int]]] = []
    progress = True
    while len(pairs) < count and progress:
        progress = False
        for i, doc in enumerate(documents):
            start = cursors[i]
            if start + window <= len(doc) and len(pairs) < count:
                pairs.append(
                    (list(doc[start : start + length]), list(doc[start + length : start + window]))
                )
                cursors[i] = start + window
                progress = True
    return pairs


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class BucketResult:
    length: int
    k: int
    spans: int
    token_ce: float
    prior_ce: float  # the base model on the span with no memory: what slots must beat
    bleu4_median: float | None = None
    bleu4_mean: float | None = None
    exact_prefix_mean: float | None = None


@dataclass(frozen=True)
class ContinuationResult:
    length: int
    k: int
    spans: int
    continuation_tokens: int
    ppl_slots: float
    ppl_raw: float

    @property
    def ratio(self) -> float:
        return self.ppl_slots / self.ppl_raw


@dataclass(frozen=True)
class QAResult:
    triples: int
    f1_mean: float
    exact_match: float
    examples: list[dict[str, str]]


def evaluate_reconstruction(
    icae: ICAE,
    texts: Sequence[str],
    *,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    ks: Sequence[int] | None = None,
    spans_per_length: int = DEFAULT_SPANS_PER_LENGTH,
    continuation_tokens: int = DEFAULT_CONTINUATION_TOKENS,
    generate: bool = True,
    qa_triples: Sequence[Triple] = (),
    qa_max_new_tokens: int = DEFAULT_QA_MAX_NEW_TOKENS,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate `icae` on held-out `texts`; returns a JSON-ready dict.

    `ks=None` uses the ICAE's own slot count for each length (`config.slots_for`); a list of
    k values evaluates every length at each k (at most `num_memory_tokens`). `generate=False`
    skips the greedy reconstructions (BLEU / exact match), the slow part on CPU. Documents are
    visited in a `seed`-shuffled order, so a few spans per length still come from many sources.
    """
    import torch

    config = icae.config
    too_long = [n for n in lengths if n > config.span_tokens]
    if too_long:
        raise EvaluationError(
            f"lengths {too_long} exceed the ICAE's span_tokens={config.span_tokens}"
        )
    if ks is not None and any(not 1 <= k <= config.num_memory_tokens for k in ks):
        raise EvaluationError(f"every k must be in 1..{config.num_memory_tokens}, got {list(ks)}")
    documents = [icae.tokenize(t) for t in texts if t.strip()]
    random.Random(seed).shuffle(documents)
    buckets: list[BucketResult] = []
    continuation: list[ContinuationResult] = []
    icae.eval()
    with torch.no_grad():
        for length in lengths:
            pairs = sample_spans(documents, length, spans_per_length, continuation_tokens)
            if not pairs:
                raise EvaluationError(
                    f"the text has no window of {length} + {continuation_tokens} tokens; "
                    "pass longer held-out text"
                )
            for k in ks if ks is not None else [config.slots_for(length)]:
                slots = [_encode(icae, span, k) for span, _ in pairs]
                buckets.append(_bucket(icae, pairs, slots, length, k, generate))
                nll_slots = [
                    _target_nll(icae, s, "lm", c) for s, (_, c) in zip(slots, pairs, strict=True)
                ]
                nll_raw = [_raw_nll(icae, span, c) for span, c in pairs]
                continuation.append(
                    ContinuationResult(
                        length=length,
                        k=k,
                        spans=len(pairs),
                        continuation_tokens=continuation_tokens,
                        ppl_slots=math.exp(statistics.fmean(nll_slots)),
                        ppl_raw=math.exp(statistics.fmean(nll_raw)),
                    )
                )
    result: dict[str, Any] = {
        "base_model": config.base_model,
        "num_memory_tokens": config.num_memory_tokens,
        "span_tokens": config.span_tokens,
        "documents": len(documents),
        "reconstruction": [asdict(b) for b in buckets],
        "continuation": [{**asdict(c), "ratio": c.ratio} for c in continuation],
    }
    if qa_triples:
        result["qa"] = asdict(qa_agreement(icae, qa_triples, max_new_tokens=qa_max_new_tokens))
    return result


def _encode(icae: ICAE, span: list[int], k: int) -> MemorySlots:
    import torch

    from icmem.icae.slots import MemorySlots

    ids = torch.tensor([span])
    tensor = icae.encode(ids, torch.ones_like(ids), num_slots=k)[0]  # (k, d)
    return MemorySlots(
        tensor=tensor.cpu(), span_id=None, token_count=len(span), fingerprint=icae.fingerprint
    )


def _bucket(
    icae: ICAE,
    pairs: list[tuple[list[int], list[int]]],
    slots: list[MemorySlots],
    length: int,
    k: int,
    generate: bool,
) -> BucketResult:
    ce = statistics.fmean(
        _target_nll(icae, s, "ae", span) for s, (span, _) in zip(slots, pairs, strict=True)
    )
    prior = statistics.fmean(_raw_nll(icae, span[:1], span[1:]) for span, _ in pairs)
    if not generate:
        return BucketResult(length=length, k=k, spans=len(pairs), token_ce=ce, prior_ce=prior)
    bleu, prefix = [], []
    for memory, (span, _) in zip(slots, pairs, strict=True):
        reference = icae.tokenize(decode_text(icae.tokenizer, span))
        hypothesis = icae.tokenize(icae.reconstruct([memory], max_new_tokens=len(span) + 8))
        bleu.append(bleu4(hypothesis, reference))
        prefix.append(exact_prefix_ratio(hypothesis, reference))
    return BucketResult(
        length=length,
        k=k,
        spans=len(pairs),
        token_ce=ce,
        prior_ce=prior,
        bleu4_median=statistics.median(bleu),
        bleu4_mean=statistics.fmean(bleu),
        exact_prefix_mean=statistics.fmean(prefix),
    )


def _target_nll(icae: ICAE, memory: MemorySlots, task: str, target: list[int]) -> float:
    """Mean token cross-entropy of `target` read after `[slots][task]` (teacher forcing)."""
    import torch

    prefix = icae.decoder_inputs([memory], task, [])  # (P, d)
    embeds = torch.cat([prefix, icae.model.get_input_embeddings()(_ids(icae, target))])
    positions = icae.decoder_positions(
        [(len(target) if memory.token_count is None else memory.token_count, memory.num_slots)],
        task,
        len(target),
    )
    logits = icae.decoder_logits(embeds[None], positions)[0]  # (P + T, V)
    return _mean_ce(logits[prefix.shape[0] - 1 : -1], target)


def _raw_nll(icae: ICAE, span: list[int], target: list[int]) -> float:
    """Mean token cross-entropy of `target` right after the raw `span` (base model alone)."""
    ids = _ids(icae, span + target)[None]
    with icae.base_model() as model:  # under the decoder's lock, as every decode is
        logits = model(input_ids=ids, use_cache=False).logits[0]  # (S + T, V)
    return _mean_ce(logits[len(span) - 1 : -1], target)


def _ids(icae: ICAE, ids: list[int]) -> torch.Tensor:
    import torch

    return torch.tensor(ids, dtype=torch.long, device=icae.device)


def _mean_ce(logits: torch.Tensor, target: list[int]) -> float:
    import torch

    labels = torch.tensor(target, dtype=torch.long, device=logits.device)
    return float(torch.nn.functional.cross_entropy(logits.float(), labels))


def qa_agreement(icae: ICAE, triples: Sequence[Triple], *, max_new_tokens: int = 64) -> QAResult:
    """Answer each prompt from the context's slots and from the raw context; compare them."""
    f1s, exact, examples = [], [], []
    for triple in triples:
        memory = icae.compress(triple.input)
        from_slots = icae.generate(memory, triple.prompt, max_new_tokens=max_new_tokens)
        assert isinstance(from_slots, str)  # not streamed
        from_raw = raw_context_answer(icae, triple.input, triple.prompt, max_new_tokens)
        f1, same = answer_agreement(from_slots, from_raw)
        f1s.append(f1)
        exact.append(same)
        examples.append({"prompt": triple.prompt, "from_slots": from_slots, "from_raw": from_raw})
    return QAResult(
        triples=len(triples),
        f1_mean=statistics.fmean(f1s),
        exact_match=statistics.fmean(exact),
        examples=examples[:3],
    )


def raw_context_answer(icae: ICAE, context: str, prompt: str, max_new_tokens: int) -> str:
    """The base model's greedy answer reading the raw context (the adapter off), through
    the same decoder as every other answer."""
    return icae.generate([], f"{context}\n\n{prompt}", max_new_tokens=max_new_tokens).strip()


def format_table(result: dict[str, Any]) -> str:
    """A plain-text summary of `evaluate_reconstruction`'s result."""

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        f"{'length':>6} {'k':>4} {'spans':>5} {'BLEU-4':>7} {'prefix':>7} {'CE':>7} {'prior':>7}"
    ]
    for b in result["reconstruction"]:
        lines.append(
            f"{b['length']:>6} {b['k']:>4} {b['spans']:>5} {num(b['bleu4_median']):>7} "
            f"{num(b['exact_prefix_mean']):>7} {num(b['token_ce']):>7} {num(b['prior_ce']):>7}"
        )
    lines.append(f"{'length':>6} {'k':>4} {'ppl(slots)':>11} {'ppl(raw)':>9} {'ratio':>6}")
    for c in result["continuation"]:
        lines.append(
            f"{c['length']:>6} {c['k']:>4} {c['ppl_slots']:>11.2f} {c['ppl_raw']:>9.2f} "
            f"{c['ratio']:>6.2f}"
        )
    if "qa" in result:
        qa = result["qa"]
        lines.append(f"QA agreement: F1 {qa['f1_mean']:.3f}, exact {qa['exact_match']:.3f}")
    return "\n".join(lines)


def read_held_out_texts(path: str | Path) -> list[str]:
    """The texts of a held-out .txt file or of every .txt file below a folder."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
    elif p.is_file():
        files = [p]
    else:
        raise EvaluationError(f"{p} does not exist; pass a held-out .txt file or folder")
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if not any(t.strip() for t in texts):
        raise EvaluationError(f"{p} holds no text")
    return texts
