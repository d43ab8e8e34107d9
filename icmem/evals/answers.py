"""Answers from memory, measured the way a user meets them: ingest documents into a store,
ask questions through ``MemoryPipeline.ask`` (recall k spans, decode), and score the answers
against gold answers and against the model reading the same spans as text.

Used by ``benchmarks/answers_from_memory.py`` and by the campaign's promotion, on invented
documents of the held-out stream (``icmem.icae.invented``), which no training run sees.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmem.icae.distill import INVENTED_SEEDS
from icmem.icae.invented import InventedDocument, invented_document

if TYPE_CHECKING:
    from icmem.icae.model import ICAE
    from icmem.pipeline import MemoryForm, MemoryPipeline

MODES = ("slots", "text", "none")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class AnswerCase:
    document: str  # the name of the document holding the answer
    question: str
    gold: str


def held_out_cases(
    documents: int, per_document: int = 1, seed: int = INVENTED_SEEDS["held_out"]
) -> tuple[list[InventedDocument], list[AnswerCase]]:
    """Invented documents of the held-out stream and questions about them (the first
    ``per_document`` of each, rotated so every kind of question appears)."""
    docs = [invented_document(i, seed) for i in range(documents)]
    cases = []
    for i, doc in enumerate(docs):
        for j in range(per_document):
            asked = doc.questions[(i + j) % len(doc.questions)]
            cases.append(AnswerCase(doc.name, asked.question, asked.answer))
    return docs, cases


def tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 (bag of lower-cased words)."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains(answer: str, gold: str) -> bool:
    """Whether the answer names the gold answer (word-bounded, case-insensitive)."""
    return f" {' '.join(tokens(gold))} " in f" {' '.join(tokens(answer))} "


def answer_all(
    pipeline: MemoryPipeline,
    cases: Sequence[AnswerCase],
    *,
    ks: Sequence[int] = (1, 4),
    modes: Sequence[str] = MODES,
    max_new_tokens: int = 48,
) -> list[dict[str, Any]]:
    """Every case answered in every mode at every k (``"none"``: the base model with no
    memory, once per case): one row per answer with its text, time and recalled documents."""
    rows = []
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"modes {sorted(unknown)} are not answer modes; use some of {MODES}")
    for case in cases:
        for mode in modes:
            for k in ks if mode != "none" else (0,):
                started = time.perf_counter()
                if mode == "none":
                    text, recalled = pipeline.icae.generate([], case.question), []
                else:
                    form: MemoryForm = "slots" if mode == "slots" else "text"
                    answer = pipeline.ask(
                        case.question, k=k, memory=form, max_new_tokens=max_new_tokens
                    )
                    text, recalled = answer.text, [h.document_id for h in answer.hits]
                rows.append(
                    {
                        "question": case.question,
                        "gold": case.gold,
                        "document": case.document,
                        "mode": mode,
                        "k": k,
                        "answer": text.strip(),
                        "seconds": time.perf_counter() - started,
                        "recalled_gold": case.document in recalled,
                    }
                )
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per ``mode@k``: answer contains gold, token F1 against gold, empty-answer rate, seconds
    per answer, recall of the gold document; for slots also token F1 against the text answer
    to the same question at the same k."""
    text_answer = {(r["question"], r["k"]): r["answer"] for r in rows if r["mode"] == "text"}
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(f"{row['mode']}@{row['k']}", []).append(row)
    summary = {}
    for name, group in groups.items():
        stats = {
            "answers": len(group),
            "contains_gold": statistics.mean(contains(r["answer"], r["gold"]) for r in group),
            "f1_gold": statistics.mean(token_f1(r["answer"], r["gold"]) for r in group),
            "empty_rate": statistics.mean(not r["answer"] for r in group),
            "seconds_per_answer": statistics.mean(r["seconds"] for r in group),
            "recalled_gold": statistics.mean(r["recalled_gold"] for r in group),
        }
        if name.startswith("slots@"):
            pairs = [(r["answer"], text_answer.get((r["question"], r["k"]))) for r in group]
            scored = [token_f1(a, t) for a, t in pairs if t is not None]
            if scored:
                stats["f1_vs_text"] = statistics.mean(scored)
        summary[name] = {k: round(v, 4) for k, v in stats.items()}
    return summary


def evaluate(
    icae: ICAE,
    documents: Sequence[InventedDocument],
    cases: Sequence[AnswerCase],
    *,
    ks: Sequence[int] = (1, 4),
    modes: Sequence[str] = MODES,
    max_new_tokens: int = 48,
    store_dir: str | Path | None = None,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Ingest ``documents`` into a fresh store (a temporary one unless ``store_dir``), answer
    ``cases``, and return ``(summary, rows)``."""
    from icmem.pipeline import MemoryPipeline

    with tempfile.TemporaryDirectory() as tmp:
        where = Path(store_dir) if store_dir is not None else Path(tmp) / "store"
        with MemoryPipeline.open(where, icae=icae, create=True) as pipeline:
            for doc in documents:
                pipeline.ingest(doc.text, document_id=doc.name, source="invented")
            rows = answer_all(pipeline, cases, ks=ks, modes=modes, max_new_tokens=max_new_tokens)
    return summarise(rows), rows
