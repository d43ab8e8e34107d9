"""`icmem chat` decodes with the chat defaults (light sampling and the loop remedies), greedy on
request, and remembers why each answer ended."""

from __future__ import annotations

from icmem.chat import ChatSession
from icmem.icae.decoder import CHAT_SAMPLING, GREEDY

DOCUMENT = "The lighthouse keeper kept the log for forty years."


def fresh(pipeline, name: str) -> tuple[str, ...]:
    """A namespace holding only the document (each session stores its own turns)."""
    namespace = ("t", "chat", name)
    pipeline.ingest(DOCUMENT, namespace=namespace)
    return namespace


def test_chat_samples_with_the_chat_defaults_and_greedy_is_exact(pipeline):
    assert ChatSession(pipeline, ("t", "chat", "x")).sampling == CHAT_SAMPLING
    namespace = fresh(pipeline, "greedy")
    expected = pipeline.ask(
        "Who kept the log?", namespace=namespace, max_new_tokens=8, repeat_stop=0
    )
    greedy = ChatSession(pipeline, namespace, max_new_tokens=8, sampling=GREEDY)
    assert "".join(greedy.say("Who kept the log?")).strip() == expected.text.strip()
    assert greedy.last_finish_reason in ("stop", "length")
    seeded = CHAT_SAMPLING.with_overrides(seed=5)
    answers = [
        "".join(
            ChatSession(
                pipeline, fresh(pipeline, f"seeded{i}"), max_new_tokens=8, sampling=seeded
            ).say("Where is the lighthouse?")
        )
        for i in range(2)
    ]
    assert answers[0] == answers[1]  # a seed makes a sampled chat repeatable
