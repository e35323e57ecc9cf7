"""`recursa generate MODEL_DIR --prompt TEXT [--prompt TEXT ...]`: continue prompts with the engine.

Several prompts run concurrently through `recursa.LLM` (continuous depth-wise batching); a
single prompt streams its text as it is generated.
"""
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
    from recursa.engine.llm import LLM
    from recursa.engine.sampling_params import SamplingParams

    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise RecursaError(f"--top-p must be in (0, 1], got {args.top_p}")
    llm = LLM(args.model)
    if llm.tokenizer is None:
        raise RecursaError(f"{args.model} has no tokenizer.json")
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k or 0, top_p=args.top_p or 1.0,
                            seed=args.seed, max_tokens=args.max_tokens)
    # ChatML, the format of SmolLM2-Instruct and most small instruct models
    texts = [f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n" if args.chat else p for p in args.prompt]
    headers = [f"> {p}\n" if args.chat else p for p in args.prompt]
    start = time.perf_counter()
    for i, text in enumerate(texts):
        llm.add_request(str(i), text, params)
    single = len(texts) == 1
    if single:  # one prompt: stream its text as it comes
        sys.stdout.write(headers[0])
        sys.stdout.flush()
    finished: dict[int, str] = {}
    n_tokens = 0
    while llm.has_unfinished():
        for out in llm.step():
            if single:
                sys.stdout.write(out.delta_text)
                sys.stdout.flush()
            if out.finished:
                finished[int(out.request_id)] = out.text
                n_tokens += len(out.token_ids)
    elapsed = time.perf_counter() - start
    if single:
        sys.stdout.write("\n")
    else:  # several prompts ran concurrently: print each when all are done, in order
        for i, header in enumerate(headers):
            sys.stdout.write(f"{header}{finished[i]}\n\n")
    stats = llm.stats()
    print(f"[{len(texts)} request{'s' if len(texts) > 1 else ''}, {n_tokens} tokens in {elapsed:.2f}s, "
          f"{n_tokens / max(elapsed, 1e-9):.1f} tok/s, {stats['tokens_per_stage_run']:.1f} tokens per stage run]",
          file=sys.stderr)
    return 0
