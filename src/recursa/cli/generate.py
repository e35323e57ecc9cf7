"""`recursa generate MODEL_DIR --prompt TEXT [--prompt TEXT ...]`: continue prompts with the engine.

Several prompts run concurrently through `recursa.LLM` (continuous depth-wise batching); a
single prompt streams its text as it is generated.

With `--exit-strategy`, tokens exit at the model's exits (config `exit_depths`, from
`recursa train --exit-depths`). `parallel` (synchronized parallel decoding: exact KV) runs in the
batching engine, any number of prompts at once; `copy` and `speculative` decode one prompt with
the single-request decoder (recursa.engine.early_exit). Either prints the text, then per token
the depth it was emitted from, then the mean depth and the share of tokens per exit. Models that
choose depth themselves (Mixture-of-Recursions) report the same without any flag:

    recursa generate runs/ee/model --prompt "Once" --exit-strategy speculative --exit-threshold 0.8
    recursa generate runs/ee/model --prompt "Once" --prompt "The" --exit-strategy parallel \
        --exit-threshold-kind free --exit-threshold 0.9 --exit-measure margin
    recursa generate runs/ee/model --prompt "Once" --exit-strategy copy --exit-measure classifier \
        --exit-threshold 0.8     # after `recursa train-exit-classifier runs/ee/model --data DIR`
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from recursa.cli import add_precision_args, positive_int
from recursa.engine.confidence import CHOICES as MEASURE_CHOICES
from recursa.engine.early_exit import STRATEGIES
from recursa.errors import RecursaError


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
    p.add_argument("--max-tokens", type=positive_int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=_non_negative_float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template (instruct models)")
    e = p.add_argument_group("early exit (parallel: in the engine, any prompts; copy/speculative: one prompt)")
    e.add_argument("--exit-strategy", choices=STRATEGIES,
                   help="KV for skipped layers: copy (CALM), parallel (FREE), speculative (LayerSkip, greedy, lossless)")
    e.add_argument("--exit-threshold", type=float, default=0.9,
                   help="exit when confidence >= this (fixed, calm); for free: the target agreement probability ζ")
    e.add_argument("--exit-threshold-kind", choices=("fixed", "calm", "free"), default="fixed",
                   help="fixed; calm: decays with the step (CALM eq. 5); free: FREE's online Beta-mixture estimate "
                        "(no exits until it has seen enough full-depth tokens)")
    e.add_argument("--exit-measure", choices=MEASURE_CHOICES, default="max_prob",
                   help="confidence: top-1 probability, top-1 minus top-2, cosine to the previous exit's hidden "
                        "state, or the model's learned exit classifier (recursa train-exit-classifier)")
    e.add_argument("--max-draft", type=positive_int, default=4, help="speculative: drafts per verification (default 4)")
    p.add_argument("--threads", type=positive_int, help="CPU intra-op threads (1 helps on a busy shared CPU)")
    add_precision_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise RecursaError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.exit_strategy not in (None, "parallel"):
        return run_early_exit(args)
    from recursa.engine.llm import LLM
    from recursa.engine.sampling_params import SamplingParams

    from recursa.data.tokenizer import load_tokenizer

    model = _load(args)
    if not (Path(args.model) / "tokenizer.json").is_file():
        raise RecursaError(f"{args.model} has no tokenizer.json")
    exit_policy = _exit_policy(args, model) if args.exit_strategy == "parallel" else None
    llm = LLM(model, load_tokenizer(args.model), exit_policy=exit_policy)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k or 0, top_p=args.top_p or 1.0,
                            seed=args.seed, max_tokens=args.max_tokens)
    texts = [_chat(p) if args.chat else p for p in args.prompt]
    headers = [f"> {p}\n" if args.chat else p for p in args.prompt]
    adaptive = exit_policy is not None or model.cfg.is_mor
    start = time.perf_counter()
    for i, text in enumerate(texts):
        llm.add_request(str(i), text, params)
    stream = len(texts) == 1 and not adaptive
    if stream:  # one prompt: stream its text as it comes
        sys.stdout.write(headers[0])
        sys.stdout.flush()
    finished = {}
    while llm.has_unfinished():
        for out in llm.step():
            if stream:
                sys.stdout.write(out.delta_text)
                sys.stdout.flush()
            if out.finished:
                finished[int(out.request_id)] = out
    elapsed = time.perf_counter() - start
    if stream:
        sys.stdout.write("\n")
    else:  # print each request when all are done, in order (+ the depth behind every token)
        for i, header in enumerate(headers):
            out = finished[i]
            sys.stdout.write(f"{header}{out.text}\n")
            if adaptive:
                _print_depths(llm.tokenizer, out.token_ids, out.exit_depths, model.depth)
            sys.stdout.write("\n")
    n_tokens = sum(len(o.token_ids) for o in finished.values())
    stats = llm.stats()
    print(f"[{len(texts)} request{'s' if len(texts) > 1 else ''}, {n_tokens} tokens in {elapsed:.2f}s, "
          f"{n_tokens / max(elapsed, 1e-9):.1f} tok/s, {stats['tokens_per_stage_run']:.1f} tokens per stage run]",
          file=sys.stderr)
    return 0


def _load(args):
    """The model of args.model, prepared for --dtype / --quantization when given."""
    from recursa.model import load
    from recursa.model.quant import prepare

    model = load(args.model)
    if args.dtype is None and args.quantization is None:
        return model
    return prepare(model, args.dtype, args.quantization, int4_weights=args.model)


def _print_depths(tokenizer, tokens: list[int], depths: list[int], n_layers: int) -> None:
    """Per token the depth its prediction came from; the mean depth and the share of tokens per depth."""
    print("token  depth  text")
    for i, (token, depth) in enumerate(zip(tokens, depths)):
        print(f"{i:5d}  {depth:5d}  {tokenizer.decode([token])!r}")
    shares = ", ".join(f"depth {d}: {depths.count(d) / len(depths):.1%}" for d in sorted(set(depths)))
    print(f"mean depth {sum(depths) / len(depths):.2f} of {n_layers} layers | tokens per exit: {shares}")


def _exit_policy(args, model):
    """The ExitPolicy the --exit-* flags describe, at the model's own exits."""
    from recursa.engine.early_exit import ExitPolicy
    from recursa.engine.exit_classifier import load_exit_classifier
    from recursa.engine.thresholds import make_threshold
    from recursa.model.exits import ExitSpec

    kind, value = args.exit_threshold_kind, args.exit_threshold
    if kind == "free" and not 0 < value < 1:
        raise RecursaError(f"--exit-threshold is FREE's target agreement probability: it must be in (0, 1), got {value}")
    spec = ExitSpec.from_config(model.cfg)
    if not spec.depths:
        raise RecursaError(f"{args.model} has no exits (config exit_depths is empty): train it with "
                           f"`recursa train --exit-depths ...`")
    threshold = (make_threshold("free", 1.0, zeta=value) if kind == "free"
                 else make_threshold(kind, value, max_steps=args.max_tokens))
    measure = load_exit_classifier(args.model, model) if args.exit_measure == "classifier" else args.exit_measure
    return ExitPolicy(spec, measure, threshold)


def _chat(prompt: str) -> str:
    """ChatML, the format of SmolLM2-Instruct and most small instruct models."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def run_early_exit(args) -> int:
    """One prompt through EarlyExitDecoder (copy, speculative); text, per-token depths, shares per exit."""
    from recursa.data.tokenizer import load_tokenizer
    from recursa.engine.early_exit import early_exit_generate

    if len(args.prompt) != 1:
        raise RecursaError(f"--exit-strategy {args.exit_strategy} decodes a single request: give one --prompt, "
                           f"got {len(args.prompt)} (--exit-strategy parallel runs several in the engine)")
    model = _load(args)
    policy = _exit_policy(args, model)
    tokenizer = load_tokenizer(args.model)
    prompt = _chat(args.prompt[0]) if args.chat else args.prompt[0]
    ids = tokenizer.encode(prompt)
    start = time.perf_counter()
    res = early_exit_generate(model, ids, args.max_tokens, policy, args.exit_strategy, max_draft=args.max_draft,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop_ids=[tokenizer.eos_id])
    elapsed = time.perf_counter() - start
    header = f"> {args.prompt[0]}\n" if args.chat else args.prompt[0]
    print(header + tokenizer.decode(res.tokens))
    _print_depths(tokenizer, res.tokens, res.exit_depths, res.n_layers)
    extra = f", {res.accepted}/{res.drafted} drafts accepted" if args.exit_strategy == "speculative" else ""
    print(f"[{len(res.tokens)} tokens in {elapsed:.2f}s, {len(res.tokens) / max(elapsed, 1e-9):.1f} tok/s, "
          f"{res.layer_tokens} token-layer forwards, {res.kv_layer_tokens} K/V-only{extra}]", file=sys.stderr)
    return 0
