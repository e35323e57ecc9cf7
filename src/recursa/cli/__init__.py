"""The `recursa` command line: `recursa <command> --help` documents each command.

Each subcommand lives in its own module here with `register(subparsers)`; user errors
(`RecursaError`, bad flags, missing files: exit 2) and system errors (unwritable or full disk:
exit 1) print one line, never a traceback; a signal exits 128 + its number.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from recursa.errors import RecursaError

COMMANDS = ["data", "train", "convert", "generate", "eval", "models", "exit_classifier", "serve"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is argparse's one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_precision_args(p) -> None:
    """--dtype / --quantization (recursa.model.quant.prepare), for commands that run a model."""
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: the checkpoint's, bfloat16 with --quantization)")
    p.add_argument("--quantization", choices=("int8", "int4"), default=None,
                   help="weight-only int8 (per channel) or int4 (groups of 32) projections; int4 uses the "
                        "model's int4.safetensors (GGUF Q4_1 blocks, `models fetch --keep-int4`) when present")


def add_compile_arg(p) -> None:
    """--compile (EngineConfig.compile), for commands that run the engine."""
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each span (faster decode after minutes of compilation on a CPU)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (and where to look) instead of the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="recursa", description="Adaptive-depth language models and their engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name in COMMANDS:
        importlib.import_module(f"recursa.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None) is not None:   # commands with --threads (positive_int)
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = args.func(args)
    except RecursaError as e:
        print(f"recursa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"recursa {args.command}: error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except OSError as e:   # unwritable or full disk, a path that is a file: the system's words, one line
        where = f": {e.filename}" if e.filename else ""
        print(f"recursa {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:   # train's Interrupted says where its checkpoint went
        print(f"recursa {args.command}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
