"""`icmem ingest` and `icmem chat` end to end on tiny models."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from icmem.store import MemoryStore
from tiny_models import tiny_embedder, tiny_icae

from icmem.chat import CHAT_SOURCE
from icmem.cli import main
from icmem.cli import memory as memory_commands
from icmem.pipeline import MemoryPipeline


@pytest.fixture
def tiny_cli(tokenizer, monkeypatch):
    """Every command opens its store with the same tiny ICAE and embedder (a fresh pipeline per
    command, as separate runs would); returns a function that reopens the store."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    icae, embedder = tiny_icae(tokenizer), tiny_embedder(tokenizer)

    def open_tiny(args, **options):
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


def test_chat_answers_from_memory_and_remembers_its_turns(tiny_cli, tmp_path, capsys, monkeypatch):
    store = str(tmp_path / "store")
    doc = tmp_path / "keeper.txt"
    doc.write_text("The lighthouse keeper kept the log for forty years.", encoding="utf-8")
    assert main(["ingest", str(doc), "--store", store, "--namespace", "t/bot/1"]) == 0
    capsys.readouterr()
    argv = ["--store", store, "--namespace", "t/bot/1"]

    lines = ["Who kept the log?", "/sources", "", "/nonsense", "And then?"]
    out = _chat(argv, lines, capsys, monkeypatch)
    sources = [line for line in out.splitlines() if line.startswith("  [")]
    assert sorted(line.split("] ")[1] for line in sources) == [f"{doc} span 0", f"{doc} span 1"]
    with tiny_cli(store) as opened:
        turns = opened.list_documents(("t", "bot", "1"))
    remembered = [d for d in turns if d.source == CHAT_SOURCE]
    assert [d.metadata["role"] for d in remembered] == ["user", "assistant"] * 2
    assert remembered[0].id != remembered[2].id

    # A second run recalls the first run's turns from the store, with ids that do not collide.
    out = _chat(argv, ["Who kept the log?", "/sources", "/exit", "never read"], capsys, monkeypatch)
    assert "chat/" in out  # a remembered turn among the sources
    with tiny_cli(store) as opened:
        documents = opened.list_documents(("t", "bot", "1"))
    assert len([d for d in documents if d.source == CHAT_SOURCE]) == 6
    assert len({d.id for d in documents}) == len(documents)

    out = _chat(argv, ["/forget", "/sources"], capsys, monkeypatch)
    assert out.splitlines()[0] == "forgot 6 remembered turns"
    assert "no sources" in out.splitlines()[1]
    with tiny_cli(store) as opened:
        assert [d.id for d in opened.list_documents(("t", "bot", "1"))] == [str(doc)]


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
