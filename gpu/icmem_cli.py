#!/usr/bin/env python3
"""`icmem ...` for gpu/train.sh, also where the store's dependencies are missing.

The device machine has torch, transformers, peft and accelerate but neither sqlalchemy nor
faiss, which `icmem.cli` imports to register the store's commands. Then this falls back to a
parser with only `icmem train ...` (same arguments, same error handling). Run it as a script
(`python3 gpu/icmem_cli.py train pretrain --config ...`), not with `-m` from the checkout's
root: there the bare `icmem/` folder, without `store/`, would shadow the installed package.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from icmem.cli import build_parser

        build_parser()  # imports every subcommand's module, the store's among them
    except ImportError as exc:
        print(f"icmem_cli: {exc}; only `icmem train ...` is available", file=sys.stderr)
    else:
        from icmem.cli import main as icmem_main

        return icmem_main(argv)

    from icmem.errors import IcmemError
    from icmem.icae.train import register_cli

    parser = argparse.ArgumentParser(prog="icmem")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    register_cli(parser.add_subparsers(title="commands", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except IcmemError as exc:
        print(f"icmem: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
