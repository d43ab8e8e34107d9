"""Scoring answers from memory: the metrics on known answers, and the held-out questions."""

from __future__ import annotations

import pytest

from icmem.evals.answers import contains, held_out_cases, summarise, token_f1
from icmem.icae.invented import invented_document


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Tobias Wren", "Tobias Wren", 1.0),
        ("The keeper was Tobias Wren.", "Tobias Wren", 2 * (2 / 5) * 1 / (2 / 5 + 1)),
        ("Ada Pell", "Tobias Wren", 0.0),
        ("", "Tobias Wren", 0.0),
        ("", "", 1.0),
    ],
)
def test_token_f1_is_squads(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected)


def test_contains_is_word_bounded_and_case_blind():
    assert contains("He was born in 1887, in Kilbride.", "1887")
    assert contains("the town of KILBRIDE", "Kilbride")
    assert not contains("in 18870", "1887")
    assert not contains("Wrenfield", "Wren")
    assert contains("Marby Hill is where it is held", "marby hill")


def test_summary_scores_each_mode_and_pairs_slots_with_text():
    rows = [
        {
            "question": "q",
            "gold": "Wren",
            "document": "d",
            "mode": "text",
            "k": 1,
            "answer": "Tobias Wren",
            "seconds": 1.0,
            "recalled_gold": True,
        },
        {
            "question": "q",
            "gold": "Wren",
            "document": "d",
            "mode": "slots",
            "k": 1,
            "answer": "Wren",
            "seconds": 0.5,
            "recalled_gold": True,
        },
        {
            "question": "p",
            "gold": "Pell",
            "document": "e",
            "mode": "slots",
            "k": 1,
            "answer": "",
            "seconds": 0.1,
            "recalled_gold": False,
        },
    ]
    summary = summarise(rows)
    assert summary["slots@1"]["contains_gold"] == 0.5
    assert summary["slots@1"]["empty_rate"] == 0.5
    assert summary["slots@1"]["recalled_gold"] == 0.5
    assert summary["slots@1"]["f1_vs_text"] == pytest.approx(2 / 3, abs=1e-4)
    assert summary["text@1"]["contains_gold"] == 1.0


def test_held_out_questions_are_answered_by_their_documents():
    documents, cases = held_out_cases(12, per_document=2)
    assert len(cases) == 24 and len({c.question for c in cases}) == 24
    by_name = {d.name: d for d in documents}
    for case in cases:
        assert case.gold in by_name[case.document].text
    # the held-out stream is not the training stream
    assert invented_document(0, seed=0).text != documents[0].text
    assert invented_document(3, seed=1) == documents[3]  # repeatable


def test_invented_documents_never_name_what_the_demo_asks_about():
    """The demo is answered by reading memory; training must not have met its people and places."""
    import re
    from importlib import resources

    demo = "".join(
        resources.files("icmem").joinpath("data", f"{name}.txt").read_text("utf-8")
        for name in ("lighthouse", "orchard")
    )
    common = {"The", "In", "His", "Her", "She", "He", "After", "All", "Their", "It", "When", "By"}
    common |= {"Red", "Orange"}  # colours, capitalised in invented ships' names
    months_and_days = set(re.findall(r"\b[A-Z][a-z]+\b", " ".join(_calendar_words())))
    proper = set(re.findall(r"\b[A-Z][a-z]+\b", demo)) - common - months_and_days
    generated = " ".join(invented_document(i, seed).text for seed in (0, 1) for i in range(400))
    assert proper & set(re.findall(r"\b[A-Z][a-z]+\b", generated)) == set()


def _calendar_words() -> list[str]:
    import calendar

    return [*calendar.month_name[1:], *calendar.day_name]
