"""The `icmem` command line: subcommands are plain functions over the public API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from importlib import resources

from icmem.errors import IcmemError


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except IcmemError as exc:
        print(f"icmem: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `icmem chunk ... | head` closed our stdout; not an error
        sys.stderr.close()
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icmem", description="Compressed long memory for RAG pipelines and agents."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    chunk_cmd = commands.add_parser("chunk", help="split a UTF-8 file into token-exact spans")
    chunk_cmd.add_argument("file", help="a UTF-8 text file")
    chunk_cmd.add_argument("--model", default=_default_model(), help="tokenizer to count with")
    chunk_cmd.add_argument("--span-tokens", type=int, default=512)
    chunk_cmd.add_argument("--overlap", type=int, default=0)
    chunk_cmd.add_argument("--errors", choices=["strict", "replace", "ignore"], default="strict")
    chunk_cmd.add_argument("--json", action="store_true", help="one JSON object per span")
    chunk_cmd.set_defaults(func=chunk_command)

    demo_cmd = commands.add_parser("demo", help="run the end-to-end demo on the default model")
    demo_cmd.add_argument("--model", default=_default_model())
    demo_cmd.set_defaults(func=demo_command)
    return parser


def chunk_command(args: argparse.Namespace) -> int:
    from icmem.chunking import chunk_file
    from icmem.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    spans = chunk_file(
        args.file,
        tokenizer,
        span_tokens=args.span_tokens,
        overlap=args.overlap,
        errors=args.errors,
    )
    for span in spans:
        if args.json:
            record = {
                "index": span.index,
                "char_start": span.char_start,
                "char_end": span.char_end,
                "token_count": span.token_count,
                "content_id": span.content_id,
                "token_ids": list(span.token_ids),
                "text": span.text,
            }
            print(json.dumps(record, ensure_ascii=False))
        else:
            preview = span.text[:60].replace("\n", " ")
            print(
                f"{span.index:5d} chars {span.char_start}-{span.char_end} "
                f"tokens {span.token_count:4d}  {preview}"
            )
    return 0


def demo_command(args: argparse.Namespace) -> int:
    from icmem.chunking import chunk
    from icmem.models import load_model

    text = resources.files("icmem").joinpath("data/sample.txt").read_text(encoding="utf-8")
    model, tokenizer = load_model(args.model)
    spans = chunk(text, tokenizer, span_tokens=128)
    print(f"sample document: {len(text)} characters -> {len(spans)} spans of <= 128 tokens")
    prompt = f"Summarise this text in one sentence.\n\n{spans[0].text}"
    print("summary of span 0:", _chat(model, tokenizer, prompt))
    return 0


def _chat(model, tokenizer, prompt: str, max_new_tokens: int = 60) -> str:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _default_model() -> str:
    from icmem.models import DEFAULT_MODEL

    return DEFAULT_MODEL


if __name__ == "__main__":
    sys.exit(main())
