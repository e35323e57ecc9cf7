"""`recursa generate MODEL_DIR --prompt TEXT`: stream a continuation from a saved model."""
from __future__ import annotations

import argparse
import sys
import time

from recursa.errors import RecursaError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a saved model", description=__doc__)
    p.add_argument("model", help="model directory (model.safetensors + config.json + tokenizer.json)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several prompts)")
    p.add_argument("--max-tokens", type=_positive_int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--top-p", type=_non_negative_float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template (instruct models)")
    p.set_defaults(func=run)


def run(args) -> int:
    from recursa.data.tokenizer import load_tokenizer
    from recursa.engine.generate import stream
    from recursa.model import load

    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise RecursaError(f"--top-p must be in (0, 1], got {args.top_p}")
    model = load(args.model)
    tok = load_tokenizer(args.model)
    for prompt in args.prompt:
        text = prompt
        if args.chat:
            # ChatML, the format of SmolLM2-Instruct and most small instruct models
            text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        ids = tok.encode(text)
        sys.stdout.write(prompt if not args.chat else f"> {prompt}\n")
        sys.stdout.flush()
        start, out = time.perf_counter(), []
        for token in stream(model, ids, args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_ids=[tok.eos_id]):
            if token == tok.eos_id:
                break
            prev = tok.decode(out)
            out.append(token)
            sys.stdout.write(tok.decode(out)[len(prev):])
            sys.stdout.flush()
        elapsed = time.perf_counter() - start
        sys.stdout.write("\n")
        print(f"[{len(out)} tokens in {elapsed:.2f}s, {len(out) / max(elapsed, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0
