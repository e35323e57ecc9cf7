"""`recursa train-exit-classifier MODEL_DIR --data DIR`: the learned exit confidence (second stage).

Runs the frozen model (with exits: config `exit_depths`) over windows of the packed corpus,
fits one small MLP per exit predicting whether the exit's top-1 equals the final layer's, reports
held-out accuracy next to max-prob at the same exit rate, and saves exit_classifier.safetensors +
exit_classifier.json into MODEL_DIR (recursa.train.exit_classifier). Then:

    recursa train-exit-classifier runs/smol-exits-lr1e-1/model --data data/corpus-smollm --steps 300 \
        --tokens 16384 --threads 1
    recursa generate runs/smol-exits-lr1e-1/model --prompt "Once" --exit-strategy parallel \
        --exit-measure classifier --exit-threshold 0.8
"""
from __future__ import annotations

import argparse

from recursa.cli import positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser("train-exit-classifier", help="train the learned exit classifier of a model with exits",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model directory with exits (the classifier is saved there)")
    p.add_argument("--data", required=True, help="directory from `recursa data prepare` (train.bin, val.bin)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--tokens", type=int, default=16384, help="train-split tokens to collect examples from")
    p.add_argument("--val-tokens", type=int, default=4096, help="val-split tokens for the report")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="windows per frozen forward")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden-dim", type=int, default=64, help="MLP width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, help="CPU intra-op threads (1 helps on a busy shared CPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recursa.train.exit_classifier import train_exit_classifier

    train_exit_classifier(args.model, args.data, steps=args.steps, tokens=args.tokens, val_tokens=args.val_tokens,
                          seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, hidden_dim=args.hidden_dim,
                          seed=args.seed)
    return 0
