"""`icmem ingest` and `icmem chat` end to end on tiny models."""

from __future__ import annotations

import io
import json
import re
import sys
import zlib

import numpy as np
import pytest
import torch
from icmem.store import MemoryStore
from tiny_models import tiny_embedder, tiny_icae

from icmem.chat import CHAT_SOURCE
from icmem.cli import main
from icmem.cli import memory as memory_commands
from icmem.pipeline import NO_MEMORY_NOTICE, MemoryPipeline, check_store_exists


@pytest.fixture
def tiny_cli(tokenizer, monkeypatch):
    """Every command opens its store with the same tiny ICAE and embedder (a fresh pipeline per
    command, as separate runs would); returns a function that reopens the store."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    icae, embedder = tiny_icae(tokenizer), tiny_embedder(tokenizer)

    def open_tiny(args, *, create=False, **options):
        if not create:
            check_store_exists(args.store)  # what MemoryPipeline.open does before loading models
        store = MemoryStore.open(args.store, dim=embedder.dim, model_fingerprint=icae.fingerprint)
        return MemoryPipeline(icae, store, embedder, codec="fp32", **options)

    monkeypatch.setattr(memory_commands, "open_pipeline", open_tiny)
    yield lambda path: MemoryStore.open(path, dim=embedder.dim)
    torch.set_num_threads(threads)


def test_ingest_reports_skips_in_its_summary_and_exit_status(tiny_cli, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The lighthouse keeper kept the log for forty years.", "utf-8")
    (docs / "b.md").write_text("# Orchard\n\nMartha planted Gravenstein apples first.", "utf-8")
    (docs / "bad.txt").write_bytes(b"ok \xff")
    store = str(tmp_path / "store")
    argv = ["ingest", str(docs), str(tmp_path / "missing"), "--store", store, "--namespace", "a/b"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert (summary["files"], summary["ingested"], summary["skipped"]) == (3, 2, 0)
    assert summary["unreadable"] == [
        {"path": str(tmp_path / "missing"), "reason": "does not exist; pass files or folders"},
        {
            "path": str(docs / "bad.txt"),
            "reason": "invalid UTF-8 at byte offset 3; fix the file or pass "
            "errors='replace' (CLI: --errors replace) to substitute U+FFFD",
        },
    ]
    assert summary["documents"] == 2
    assert f"icmem: skipped {docs / 'bad.txt'}" in captured.err  # as it happened

    argv = ["ingest", str(docs), "--store", store, "--namespace", "a/b", "--errors", "replace"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["ingested"], summary["skipped"], summary["unreadable"]) == (1, 2, [])
    assert summary["documents"] == 3


def _chat(argv, lines, capsys, monkeypatch) -> str:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    assert main(["chat", *argv, "--max-new-tokens", "3", "-k", "2"]) == 0
    return capsys.readouterr().out


def test_chat_answers_from_memory_and_remembers_what_the_user_said(
    tiny_cli, tmp_path, capsys, monkeypatch
):
    store = str(tmp_path / "store")
    doc = tmp_path / "keeper.txt"
    doc.write_text("The lighthouse keeper kept the log for forty years.", encoding="utf-8")
    assert main(["ingest", str(doc), "--store", store, "--namespace", "t/bot/1"]) == 0
    capsys.readouterr()
    argv = ["--store", store, "--namespace", "t/bot/1"]

    lines = ["Who kept the log?", "/sources", "", "/nonsense", "And then?"]
    out = _chat(argv, lines, capsys, monkeypatch)
    assert 'recalled from the documents (["t", "bot", "1"]):' in out
    sources = [line for line in out.splitlines() if line.startswith("  [")]
    assert sorted(line.split("] ")[1] for line in sources) == [f"{doc} span 0", f"{doc} span 1"]
    chat = ("chat", "t", "bot", "1")
    with tiny_cli(store) as opened:
        remembered = opened.list_documents(chat)
        assert [d.id for d in opened.list_documents(("t", "bot", "1"))] == [str(doc)]
    # What the user said, not the model's replies; the turns live apart from the documents.
    assert all(d.source == CHAT_SOURCE for d in remembered)
    assert [d.metadata["role"] for d in remembered] == ["user", "user"]
    assert [d.metadata.get("question") for d in remembered] == [True, True]

    out = _chat([*argv, "--remember-replies"], ["I like tea.", "/exit", "x"], capsys, monkeypatch)
    with tiny_cli(store) as opened:
        remembered = opened.list_documents(chat)
    roles = [d.metadata["role"] for d in remembered]
    replied = out.splitlines()[0].removeprefix(NO_MEMORY_NOTICE.strip()).strip()
    assert roles == ["user", "user", "user"] + (["assistant"] if replied else [])

    out = _chat(argv, ["/forget", "/sources"], capsys, monkeypatch)
    assert out.splitlines()[0] == f"forgot {len(roles)} remembered turns"
    assert "no sources" in out.splitlines()[1]
    with tiny_cli(store) as opened:
        assert opened.list_documents(chat) == []
        assert [d.id for d in opened.list_documents(("t", "bot", "1"))] == [str(doc)]


def test_commands_that_read_refuse_a_store_that_does_not_exist(tiny_cli, tmp_path, capsys):
    typo = tmp_path / "stroe"
    for argv in (["ask", "Who?", "--store", str(typo)], ["chat", "--store", str(typo)]):
        assert main(argv) == 1
        error = capsys.readouterr().err
        assert f"no memory store at {typo}" in error
        assert f"icmem ingest FILES --store {typo}" in error
    assert not typo.exists()


def test_chat_refuses_a_conversation_namespace_that_overlaps_the_documents(
    tiny_cli, tmp_path, capsys, monkeypatch
):
    doc = tmp_path / "a.txt"
    doc.write_text("The lighthouse keeper kept the log.", "utf-8")
    store = str(tmp_path / "store")
    assert main(["ingest", str(doc), "--store", store, "--namespace", "kb"]) == 0
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    for chat_namespace in ("kb", "kb/chat"):
        argv = ["chat", "--store", store, "--namespace", "kb", "--chat-namespace", chat_namespace]
        assert main(argv) == 1
        assert "overlap, so recalling one would read the other" in capsys.readouterr().err
    with tiny_cli(store) as opened:
        assert [d.id for d in opened.list_documents(("kb",))] == [str(doc)]  # nothing stored


def test_chat_refuses_a_message_too_long_to_read_and_goes_on(
    tiny_cli, tmp_path, capsys, monkeypatch
):
    doc = tmp_path / "a.txt"
    doc.write_text("The lighthouse keeper kept the log.", "utf-8")
    store = str(tmp_path / "store")
    assert main(["ingest", str(doc), "--store", store]) == 0
    capsys.readouterr()
    long_line = "Paris is the capital of France. " * 100
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{long_line}\nWho kept the log?\n"))
    assert main(["chat", "--store", store, "--max-new-tokens", "2"]) == 0
    assert "tokens, more than the 256 this model reads at once" in capsys.readouterr().err
    with tiny_cli(store) as opened:
        (turn,) = opened.list_documents(("chat", "default", "default", "default"))
    # The chat went on to the next message, and only the message it read is remembered.
    assert (turn.metadata["role"], turn.metadata["question"]) == ("user", True)


class BagOfWords:
    """A deterministic embedder whose similarities mean something (shared words), so that which
    namespace a question recalls from is a known answer, not the luck of random weights."""

    dim = 64

    def embed(self, texts):
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                if word not in {"user", "assistant", "the", "is", "a", "who", "what", "my"}:
                    vectors[row, zlib.crc32(word.encode()) % self.dim] += 1.0
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms == 0, 1.0, norms)


def test_chat_restarted_twice_recalls_documents_and_conversation_for_their_questions(
    tokenizer, tmp_path, capsys, monkeypatch
):
    """Issue 23's acceptance: `icmem chat` over an ingested folder, restarted twice, recalls
    documents for document questions and the conversation for conversation questions."""
    icae, embedder = tiny_icae(tokenizer), BagOfWords()

    def open_bag(args, *, create=False, **options):
        if not create:
            check_store_exists(args.store)
        store = MemoryStore.open(args.store, dim=embedder.dim, model_fingerprint=icae.fingerprint)
        return MemoryPipeline(icae, store, embedder, codec="fp32", **options)

    monkeypatch.setattr(memory_commands, "open_pipeline", open_bag)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "lighthouse.txt").write_text("The lighthouse keeper kept the log.", "utf-8")
    (docs / "orchard.txt").write_text("Martha planted Gravenstein apples first.", "utf-8")
    store = str(tmp_path / "store")
    assert main(["ingest", str(docs), "--store", store]) == 0
    capsys.readouterr()
    argv = ["--store", store]

    def recalled(out: str) -> list[tuple[str, list[str]]]:
        """(namespace kind, document ids) of each /sources in a chat's output."""
        found: list[tuple[str, list[str]]] = []
        for line in out.splitlines():
            if line.startswith("recalled from the "):
                scores: list[float] = []
                found.append((line.split()[3], []))
            elif line.startswith("  [") and found:
                score, where = line.strip()[1:].split("] ")
                scores.append(float(score))
                found[-1][1].append(where.rsplit(" span ", 1)[0])
                assert scores == sorted(scores, reverse=True) and scores[-1] >= 0  # not nan
        return found

    lighthouse, orchard = str(docs / "lighthouse.txt"), str(docs / "orchard.txt")
    first = _chat(
        argv,
        ["My cat is called Miso.", "Who kept the lighthouse log?", "/sources"],
        capsys,
        monkeypatch,
    )
    assert recalled(first) == [("documents", [lighthouse, orchard])]
    for _restart in range(2):
        out = _chat(
            argv,
            [
                "What is my cat called?",
                "/sources",
                "Who kept the lighthouse log?",  # asked before: the old question is not recalled
                "/sources",
                "Which apples did Martha plant?",
                "/sources",
            ],
            capsys,
            monkeypatch,
        )
        (conversation, lighthouse_hits, orchard_hits) = recalled(out)
        assert conversation[0] == "conversation"
        assert conversation[1][0].startswith("chat/")  # the turn that named the cat, first
        assert lighthouse_hits == ("documents", [lighthouse, orchard])
        assert orchard_hits == ("documents", [orchard, lighthouse])
    with MemoryStore.open(store, dim=embedder.dim) as opened:
        turns = opened.list_documents(("chat", "default", "default", "default"))
        assert [d.id for d in opened.list_documents(("default",))] == [lighthouse, orchard]
    # Every user message was remembered (two, then three in each restart), replies were not,
    # and only the statement is recallable (questions are kept, never recalled).
    assert [d.metadata["role"] for d in turns] == ["user"] * 8
    assert [d.metadata.get("question", False) for d in turns].count(False) == 1


def test_ingest_on_ray_says_how_to_install_ray_and_refuses_bad_options(
    tmp_path, capsys, monkeypatch
):
    doc = tmp_path / "a.txt"
    doc.write_text("The lighthouse keeper kept the log.", "utf-8")
    store = str(tmp_path / "store")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["ingest", str(doc), "--store", store, "--ray"]) == 1
    assert 'needs Ray: pip install "icmem[ray]"' in capsys.readouterr().err
    assert main(["ingest", str(doc), "--store", store, "--workers", "2"]) == 1
    assert "add --ray" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # --ray took the path for its address
        main(["ingest", "--ray", str(doc), "--store", store])
    assert exit_info.value.code == 2
    assert "put --ray after the paths or write --ray=ADDRESS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ingest", str(doc), "--store", store, "--ray", "--workers", "0"])
    assert "0 is not a positive number" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # nothing was opened or written


def test_int8_decoder_flag_decodes_through_int8_copies(tiny_cli, tmp_path, capsys, monkeypatch):
    """`--int8-decoder` switches the opened pipeline's decoder to its int8 copies; without the
    flag the exact float decoder answers."""
    from icmem.icae.int8_linear import Int8Linear

    opened = []
    open_tiny = memory_commands.open_pipeline

    def remember(args, **options):
        opened.append(open_tiny(args, **options))
        return opened[-1]

    monkeypatch.setattr(memory_commands, "open_pipeline", remember)
    store = str(tmp_path / "store")
    doc = tmp_path / "keeper.txt"
    doc.write_text("The lighthouse keeper kept the log for forty years.", encoding="utf-8")
    assert main(["ingest", str(doc), "--store", store]) == 0
    for flags, expected in (([], False), (["--int8-decoder"], True)):
        assert (
            main(["ask", "Who kept the log?", "--store", store, "--max-new-tokens", "2", *flags])
            == 0
        )
        decoder = opened[-1].icae.decoder
        assert decoder.int8_weights is expected
        quantized = any(isinstance(m, Int8Linear) for m in decoder.model(True).modules())
        assert quantized is expected
    _chat(["--store", store, "--int8-decoder"], ["Who kept the log?"], capsys, monkeypatch)
    assert opened[-1].icae.decoder.int8_weights
