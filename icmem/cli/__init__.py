"""The `icmem` command line (`icmem.cli.main` holds its table of subcommands)."""

from icmem.cli.main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
