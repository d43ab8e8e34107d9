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


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("acme/bot/t1", ("acme", "bot", "t1")),
        ("users", ("users",)),
        ("org/team/project/notes/2026", ("org", "team", "project", "notes", "2026")),
        ('["users", "u/1", "memories"]', ("users", "u/1", "memories")),
    ],
)
def test_namespaces_of_any_depth_are_read(value, expected):
    args = build_parser().parse_args(["ask", "q", "--store", "s", "--namespace", value])
    assert args.namespace == expected


@pytest.mark.parametrize("value", ["a//b", '["a", 1]', "[not json"])
def test_a_bad_namespace_is_a_clean_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["ask", "q", "--store", "s", "--namespace", value])
    assert exit_info.value.code == 2
    assert "namespace" in capsys.readouterr().err
