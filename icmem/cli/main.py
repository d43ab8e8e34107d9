"""The `icmem` command line: one table of subcommands, each a thin layer over library functions.

Every argument is parsed here, in `icmem.cli`; library modules take plain values. Building the
parser imports no model or store code (torch, transformers, SQLAlchemy and FAISS load when a
command runs), so `icmem --help` is instant and `icmem train ...` works where the store's
dependencies are missing.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from icmem.cli import evals, memory, store, train
from icmem.errors import IcmemError

Handler = Callable[[argparse.Namespace], int]
AddOptions = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    """One subcommand: its words (``"store stats"``), what it does, its options and handler."""

    words: str
    help: str
    add_options: AddOptions
    run: Handler


@dataclass(frozen=True)
class Group:
    """A word that only groups subcommands (``eval``, ``train``, ``store``)."""

    word: str
    help: str
    title: str
    metavar: str
    dest: str | None = None


GROUPS: tuple[Group, ...] = (
    Group("eval", "evaluate long-context decoding or an ICAE", "evaluations", "EVAL"),
    Group("train", "train an ICAE and build its data", "stages", "STAGE", dest="stage"),
    Group("store", "inspect or repair a memory store", "actions", "ACTION"),
)

COMMANDS: tuple[Command, ...] = (
    Command(
        "chunk", "split a UTF-8 file into token-exact spans", memory.chunk_options, memory.chunk
    ),
    Command(
        "ingest",
        "compress files (txt, md, html, pdf, jsonl) into a memory store",
        memory.ingest_options,
        memory.ingest,
    ),
    Command("ask", "answer a question from a memory store", memory.ask_options, memory.ask),
    Command(
        "chat",
        "talk with a memory store; the conversation is remembered in its namespace",
        memory.chat_options,
        memory.chat,
    ),
    Command(
        "demo", "run the end-to-end demo on the default model", memory.demo_options, memory.demo
    ),
    Command(
        "eval ppl",
        "perplexity per position bucket on a long text",
        evals.ppl_options,
        evals.ppl,
    ),
    Command(
        "eval passkey", "passkey retrieval at several depths", evals.passkey_options, evals.passkey
    ),
    Command(
        "eval reconstruct",
        "BLEU, exact match and loss of ICAE reconstruction on held-out text",
        evals.reconstruct_options,
        evals.reconstruct,
    ),
    Command(
        "train pretrain", "pretrain an ICAE from a JSON config", train.run_options, train.pretrain
    ),
    Command(
        "train finetune", "finetune an ICAE from a JSON config", train.run_options, train.finetune
    ),
    Command(
        "train distill",
        "distil the base model reading text into the slot decoder (JSON config)",
        train.run_options,
        train.distill,
    ),
    Command(
        "train campaign",
        "continue the default ICAE's training campaign",
        train.campaign_options,
        train.campaign,
    ),
    Command(
        "train corpus",
        "write a pretraining corpus from text on this machine",
        train.corpus_options,
        train.corpus,
    ),
    Command(
        "train export",
        "save a run's latest checkpoint as a loadable ICAE",
        train.export_options,
        train.export,
    ),
    Command(
        "train held-out",
        "copy a corpus's held-out documents to a folder",
        train.held_out_options,
        train.held_out,
    ),
    Command(
        "train distill-cache",
        "teach distillation records into a cache (slots and teacher distributions)",
        train.distill_cache_options,
        train.distill_cache,
    ),
    Command(
        "train instructions",
        "write PwC-style fine-tuning triples",
        train.instructions_options,
        train.instructions,
    ),
    Command("store stats", "counts and bytes on disk, as JSON", store.stats_options, store.stats),
    Command(
        "store namespaces",
        "list namespaces, one JSON array of labels a line",
        store.store_options,
        store.namespaces,
    ),
    Command(
        "store reindex", "rebuild the FAISS index from the rows", store.store_options, store.reindex
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icmem", description="Compressed long memory for RAG pipelines and agents."
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log progress details and show the libraries' own warnings and progress bars",
    )
    top = parser.add_subparsers(title="commands", metavar="COMMAND")
    groups = {}
    for command in COMMANDS:
        *group_words, word = command.words.split()
        subparsers = top
        if group_words:
            (group_word,) = group_words
            if group_word not in groups:
                group = next(g for g in GROUPS if g.word == group_word)
                group_parser = top.add_parser(group.word, help=group.help)
                named = {"dest": group.dest} if group.dest else {}
                groups[group_word] = group_parser.add_subparsers(
                    title=group.title, metavar=group.metavar, required=True, **named
                )
            subparsers = groups[group_word]
        sub = subparsers.add_parser(word, help=command.help, description=command.help)
        command.add_options(sub)
        sub.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    quiet_libraries(verbose=args.verbose)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # `icmem chunk ... | head` closed our stdout: not an error. Point stdout at devnull so
        # that the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (IcmemError, OSError) as exc:  # bad input or a missing file: the message says which
        print(f"icmem: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "icmem: interrupted; what finished is kept (ingest again: stored documents are "
            "skipped and a large one continues after its finished parts; training: continue "
            "with --resume)",
            file=sys.stderr,
        )
        return 130


def quiet_libraries(*, verbose: bool) -> None:
    """Show icmem's own progress and results only: the libraries' deprecation warnings and
    weight-loading bars are for their developers, not for someone running a command."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    if verbose:
        return
    # Read by transformers and huggingface_hub when they are imported (after this point).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Deprecations inside transformers are often attributed (by stacklevel) to the caller.
    warnings.filterwarnings("ignore", category=FutureWarning)
    for module in ("transformers", "peft", "torch", "accelerate", "huggingface_hub"):
        warnings.filterwarnings("ignore", category=UserWarning, module=rf"{module}(\.|$)")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=rf"{module}(\.|$)")
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # a damaged PDF is reported as a skip
    if "transformers" in sys.modules:  # already imported (tests, notebooks): tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
