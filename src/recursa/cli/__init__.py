"""The `recursa` command line: `recursa <command> --help` documents each command.

Each subcommand lives in its own module here with `register(subparsers)`; user errors
(`RecursaError`, bad flags, missing files) print one line and exit non-zero, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from recursa.errors import RecursaError

COMMANDS = ["data", "train", "convert", "generate", "eval", "models", "exit_classifier"]


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
                   help="weight-only int8 (per channel) or int4 (groups of 32); int4 uses the model's "
                        "int4.safetensors (GGUF Q4_1 blocks, `models fetch --keep-int4`) when present")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recursa", description="Adaptive-depth language models and their engine.")
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
    except KeyboardInterrupt:
        print(f"recursa {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
