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


class _Pieces(list):
    """What `pipeline.reply(...).pieces` is to the session: text pieces and why they ended."""

    def __init__(self, pieces: list[str], finish_reason: str) -> None:
        super().__init__(pieces)
        self.finish_reason = finish_reason


def test_remembered_replies_skip_the_empty_and_the_self_repeating(pipeline, monkeypatch):
    from types import SimpleNamespace

    namespace = fresh(pipeline, "remember")
    session = ChatSession(pipeline, namespace, max_new_tokens=8, remember_replies=True)
    replies = iter(
        [
            ("The keeper.", "stop"),
            ("So glad. So glad. So glad.", "repetition"),
            ("", "stop"),
        ]
    )

    def reply(*_args, **_kwargs):
        text, reason = next(replies)
        return SimpleNamespace(notice=None, pieces=_Pieces([text], reason))

    monkeypatch.setattr(pipeline, "reply", reply)
    for message in ("Who kept the log?", "Are you glad?", "Anything else?"):
        "".join(session.say(message))
    assert session.last_finish_reason == "stop"
    remembered = [
        d.metadata.get("role") for d in pipeline.list_documents(session.conversation, exact=True)
    ]
    assert remembered.count("assistant") == 1  # only "The keeper."
    assert remembered.count("user") == 3
