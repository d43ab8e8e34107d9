"""The CLI is a thin layer: check its wiring and its error reporting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from icmem.cli import main


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


def test_importing_the_cli_and_building_its_parser_loads_no_model_or_store_code():
    """`icmem --help` stays instant, and `icmem train` runs where SQLAlchemy/FAISS are missing."""
    heavy = ("torch", "transformers", "peft", "sqlalchemy", "faiss", "numpy", "lxml", "pypdf")
    code = (
        "import sys, icmem.cli; icmem.cli.build_parser(); "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_a_group_without_its_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["store"])
    assert exit_info.value.code == 2
    assert "ACTION" in capsys.readouterr().err


def test_a_missing_file_is_a_clean_error(tmp_path, capsys):
    assert main(["chunk", str(tmp_path / "nope.txt"), "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("icmem: error: ") and "Traceback" not in err


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    from tiny_models import tiny_model

    tokenizer.save_pretrained(tmp_path / "tiny")
    tiny_model().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_a_closed_pipe_ends_the_output_quietly(tmp_path, tiny_model_dir, monkeypatch, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 2000, encoding="utf-8")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone, as `| head -n 1` does after one line
    with open(write_end, "w", encoding="utf-8") as closed_pipe:
        monkeypatch.setattr("sys.stdout", closed_pipe)
        assert main(["chunk", str(doc), "--model", str(tiny_model_dir), "--json"]) == 0
    assert capsys.readouterr().err == ""


def test_commands_show_only_their_own_output_unless_verbose(
    tiny_model_dir, capfd, recwarn, monkeypatch
):
    from transformers.utils import logging as hf_logging

    from icmem.evals import long_context

    passkey_accuracy = long_context.passkey_accuracy

    def deprecated_inside(*args, **kwargs):
        # A library's deprecation raised while the command runs, as transformers raises them
        # for calls its own code makes (icmem's decoding no longer triggers one itself).
        warnings.warn("`past_key_values` is deprecated", FutureWarning, stacklevel=1)
        return passkey_accuracy(*args, **kwargs)

    monkeypatch.setattr(long_context, "passkey_accuracy", deprecated_inside)
    argv = ["eval", "passkey", "--model", str(tiny_model_dir), "--tokens", "40"]
    argv += ["--depths", "0", "--trials", "1", "--vanilla", "--json"]
    verbosity = hf_logging.get_verbosity()
    try:
        assert main(["-v", *argv]) == 0
        # -v shows transformers' deprecation warnings (so the check below can fail) ...
        assert [w for w in recwarn if issubclass(w.category, FutureWarning)]
        recwarn.clear()
        capfd.readouterr()
        assert main(argv) == 0  # ... and without it, they are gone
        quiet = capfd.readouterr()
        assert json.loads(quiet.out)["mode"] == "vanilla"
        assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
        assert "Loading" not in quiet.err  # no weight-loading bar
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
