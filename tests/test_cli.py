"""The CLI is a thin layer: check its wiring and its error reporting."""

from __future__ import annotations

import json

import pytest

from icmem.cli import build_parser, main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("chunk", "ingest", "ask", "demo", "eval", "train", "store"):
        assert command in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["eval", "--help"], ("ppl", "passkey", "reconstruct")),
        (["train", "--help"], ("pretrain", "finetune")),
        (["store", "--help"], ("stats", "namespaces", "reindex")),
    ],
)
def test_subcommand_groups_are_wired(capsys, argv, expected):
    with pytest.raises(SystemExit):
        main(argv)
    out = capsys.readouterr().out
    for name in expected:
        assert name in out


def test_chunk_json_prints_spans(tmp_path, tokenizer, capsys):
    tokenizer.save_pretrained(tmp_path / "tok")
    from tiny_models import tiny_model

    tiny_model().save_pretrained(tmp_path / "tok")
    text = "The quick brown fox jumps over the lazy dog. " * 30
    doc = tmp_path / "doc.txt"
    doc.write_text(text, encoding="utf-8")
    assert (
        main(["chunk", str(doc), "--model", str(tmp_path / "tok"), "--span-tokens", "40", "--json"])
        == 0
    )
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) > 1
    assert "".join(r["text"] for r in records) == text
    assert all(r["token_count"] <= 40 for r in records)
    assert [r["index"] for r in records] == list(range(len(records)))


def test_bad_file_is_a_clean_error(tmp_path, tokenizer, capsys):
    tokenizer.save_pretrained(tmp_path / "tok")
    from tiny_models import tiny_model

    tiny_model().save_pretrained(tmp_path / "tok")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff")
    assert main(["chunk", str(bad), "--model", str(tmp_path / "tok")]) == 1
    assert "byte offset 3" in capsys.readouterr().err


def test_parser_builds_without_loading_models():
    assert build_parser().prog == "icmem"
