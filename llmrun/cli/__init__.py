"""The `llmrun` command. Thin: parses arguments, imports heavy modules (torch, textual)
only inside the subcommand that needs them, so `llmrun --help` is instant.

Each subcommand lives in its own module exposing `add_parser(subparsers)`; the parser's
`run(args) -> int` default does the work. Errors the user can act on are LlmrunError and
print as one line; anything else prints one line too, and the traceback only with --debug.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = [
    "llmrun.cli.generate",
    "llmrun.cli.list_models",
    "llmrun.cli.quantize",
    "llmrun.cli.bench",
    "llmrun.cli.chat",
    "llmrun.cli.eval",
    "llmrun.cli.serve",
    "llmrun.cli.warmup",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmrun", description="Run quantized Llama and Gemma models fast on a CPU."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # subcommand not present in this build
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    debug = args.debug
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        # Exit now: background compile workers and exit hooks could be interrupted again and
        # turn this into a traceback. Every file llmrun writes is renamed into place when
        # complete, so nothing is left half-written.
        print("llmrun: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    except BrokenPipeError:
        return 0
    except Exception as exc:  # one line for the user; --debug shows the traceback
        from llmrun.errors import LlmrunError

        if debug:
            raise
        if isinstance(exc, LlmrunError):
            print(f"llmrun: error: {exc}", file=sys.stderr)
        else:
            print(
                f"llmrun: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                file=sys.stderr,
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())
