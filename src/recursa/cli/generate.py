"""`recursa generate MODEL_DIR --prompt TEXT [--prompt TEXT ...]`: continue prompts with the engine.

Several prompts run concurrently through `recursa.LLM` (continuous depth-wise batching); a
single prompt streams its text as it is generated.

With `--exit-strategy`, one prompt is decoded by the single-request early-exit decoder
(recursa.engine.early_exit) at the model's exits (config `exit_depths`, from
`recursa train --exit-depths`); it prints the text, then per token the depth it was emitted
from, then the mean depth and the share of tokens per exit:

    recursa generate runs/ee/model --prompt "Once" --exit-strategy speculative --exit-threshold 0.8
    recursa generate runs/ee/model --prompt "Once" --exit-strategy parallel --exit-threshold-kind free \
        --exit-threshold 0.9 --exit-measure margin
"""
from __future__ import annotations

import argparse
import sys
import time

from recursa.errors import RecursaError

STRATEGIES = ("copy", "parallel", "speculative")  # recursa.engine.early_exit.STRATEGIES (kept import-free here)


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
    e = p.add_argument_group("early exit (one prompt, single-request decoder)")
    e.add_argument("--exit-strategy", choices=STRATEGIES,
                   help="KV for skipped layers: copy (CALM), parallel (FREE), speculative (LayerSkip, greedy, lossless)")
    e.add_argument("--exit-threshold", type=float, default=0.9,
                   help="exit when confidence >= this (fixed, calm); for free: the target agreement probability ζ")
    e.add_argument("--exit-threshold-kind", choices=("fixed", "calm", "free"), default="fixed",
                   help="fixed; calm: decays with the step (CALM eq. 5); free: FREE's online Beta-mixture estimate "
                        "(no exits until it has seen enough full-depth tokens)")
    e.add_argument("--exit-measure", choices=("max_prob", "margin", "saturation"), default="max_prob",
                   help="confidence: top-1 probability, top-1 minus top-2, cosine to the previous exit's hidden state")
    e.add_argument("--max-draft", type=_positive_int, default=4, help="speculative: drafts per verification (default 4)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise RecursaError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.exit_strategy is not None:
        return run_early_exit(args)
    from recursa.engine.llm import LLM
    from recursa.engine.sampling_params import SamplingParams

    llm = LLM(args.model)
    if llm.tokenizer is None:
        raise RecursaError(f"{args.model} has no tokenizer.json")
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k or 0, top_p=args.top_p or 1.0,
                            seed=args.seed, max_tokens=args.max_tokens)
    texts = [_chat(p) if args.chat else p for p in args.prompt]
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


def _chat(prompt: str) -> str:
    """ChatML, the format of SmolLM2-Instruct and most small instruct models."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def run_early_exit(args) -> int:
    """One prompt through EarlyExitDecoder; text, per-token exit depths, mean depth, shares per exit."""
    from recursa.data.tokenizer import load_tokenizer
    from recursa.engine.early_exit import ExitPolicy, early_exit_generate
    from recursa.engine.thresholds import make_threshold
    from recursa.model import load
    from recursa.model.exits import ExitSpec

    if len(args.prompt) != 1:
        raise RecursaError(f"--exit-strategy decodes a single request: give one --prompt, got {len(args.prompt)}")
    kind, value = args.exit_threshold_kind, args.exit_threshold
    if kind == "free" and not 0 < value < 1:
        raise RecursaError(f"--exit-threshold is FREE's target agreement probability: it must be in (0, 1), got {value}")
    model = load(args.model)
    spec = ExitSpec.from_config(model.cfg)
    if not spec.depths:
        raise RecursaError(f"{args.model} has no exits (config exit_depths is empty): train it with "
                           f"`recursa train --exit-depths ...`")
    tokenizer = load_tokenizer(args.model)
    prompt = _chat(args.prompt[0]) if args.chat else args.prompt[0]
    ids = tokenizer.encode(prompt)
    threshold = (make_threshold("free", 1.0, zeta=value) if kind == "free"
                 else make_threshold(kind, value, max_steps=args.max_tokens))
    policy = ExitPolicy(spec, args.exit_measure, threshold)
    start = time.perf_counter()
    res = early_exit_generate(model, ids, args.max_tokens, policy, args.exit_strategy, max_draft=args.max_draft,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop_ids=[tokenizer.eos_id])
    elapsed = time.perf_counter() - start
    header = f"> {args.prompt[0]}\n" if args.chat else args.prompt[0]
    print(header + tokenizer.decode(res.tokens))
    print("token  depth  text")
    for i, (token, depth) in enumerate(zip(res.tokens, res.exit_depths)):
        print(f"{i:5d}  {depth:5d}  {tokenizer.decode([token])!r}")
    shares = ", ".join(f"depth {d}: {share:.1%}" for d, share in res.exit_shares.items())
    print(f"mean depth {res.mean_depth:.2f} of {res.n_layers} layers | tokens per exit: {shares}")
    extra = f", {res.accepted}/{res.drafted} drafts accepted" if args.exit_strategy == "speculative" else ""
    print(f"[{len(res.tokens)} tokens in {elapsed:.2f}s, {len(res.tokens) / max(elapsed, 1e-9):.1f} tok/s, "
          f"{res.layer_tokens} token-layer forwards{extra}]", file=sys.stderr)
    return 0
