"""`recursa generate MODEL_DIR --prompt TEXT [--prompt TEXT ...]`: continue prompts with the engine.

Several prompts run concurrently through `recursa.LLM` (continuous depth-wise batching); a
single prompt streams its text as it is generated.

With `--exit-strategy`, tokens exit at the model's exits (config `exit_depths`, from
`recursa train --exit-depths`), in the batching engine, any number of prompts at once: `parallel`
(synchronized parallel decoding: exact KV), `copy` (CALM's state copying: approximate KV) or
`speculative` (self-speculative draft-and-verify: output equals full depth, greedy only). It
prints the text, then per token the depth it was emitted from, then the mean depth and the share
of tokens per exit (speculative: also the drafts accepted). Models that choose depth themselves
(Mixture-of-Recursions) report the same without any flag:

    recursa generate runs/ee/model --prompt "Once" --exit-strategy speculative --exit-threshold 0.8
    recursa generate runs/ee/model --prompt "Once" --prompt "The" --exit-strategy parallel \
        --exit-threshold-kind free --exit-threshold 0.9 --exit-measure margin
    recursa generate runs/ee/model --prompt "Once" --exit-strategy copy --exit-measure classifier \
        --exit-threshold 0.8     # after `recursa train-exit-classifier runs/ee/model --data DIR`

`--target-agreement 0.95` chooses the threshold instead (recursa.engine.calibration): on windows of
`--calibration-data` (a prepared corpus, its val split) continued greedily at full depth, the least
conservative threshold whose agreement with full depth has a Clopper-Pearson lower bound >= 0.95 at
confidence 1 - `--calibration-delta`; it prints the bound and the agreement on a separate split, and
saves the rule (default MODEL/exit_calibration.json; `--exit-policy-file` elsewhere). Without
`--calibration-data` it reuses that file, which must be for the same target, delta and measure:

    recursa generate runs/ee/model --prompt "Once" --exit-strategy parallel --exit-measure saturation \
        --target-agreement 0.95 --calibration-data data/corpus
    recursa generate runs/ee/model --prompt "Once" --exit-strategy parallel --exit-policy-file F.json
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from recursa.cli import add_compile_arg, add_precision_args, positive_int
from recursa.model.confidence import CHOICES as MEASURE_CHOICES
from recursa.engine.config import EXIT_STRATEGIES as STRATEGIES
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
    e = p.add_argument_group("early exit (in the engine, any number of prompts)")
    e.add_argument("--exit-strategy", choices=STRATEGIES,
                   help="KV for skipped layers: copy (CALM), parallel (FREE), speculative (LayerSkip, greedy, lossless)")
    e.add_argument("--exit-threshold", type=float, default=None,
                   help="exit when confidence >= this, in [0, 1] (fixed, calm; default 0.9); for free: the target "
                        "agreement probability ζ in (0, 1)")
    e.add_argument("--exit-threshold-kind", choices=("fixed", "calm", "free"), default=None,
                   help="fixed; calm: decays with the step (CALM eq. 5); free: FREE's online Beta-mixture estimate "
                        "(no exits until it has seen enough full-depth tokens)")
    e.add_argument("--exit-measure", choices=MEASURE_CHOICES, default=None,
                   help="confidence: top-1 probability, top-1 minus top-2, cosine to the previous exit's hidden "
                        "state, or the model's learned exit classifier (recursa train-exit-classifier)")
    e.add_argument("--target-agreement", type=float, default=None,
                   help="choose the threshold so that agreement with full depth is >= this, in (0, 1), with "
                        "confidence 1 - --calibration-delta (calibrated on --calibration-data, or the saved rule)")
    e.add_argument("--calibration-data", help="prepared corpus (recursa data prepare) to calibrate on: its val split")
    e.add_argument("--calibration-delta", type=float, default=0.05,
                   help="1 - the confidence of the agreement bound, in (0, 1) (default 0.05)")
    e.add_argument("--calibration-sequences", type=positive_int, default=64,
                   help="calibration sequences, and as many held-out ones (default 64)")
    e.add_argument("--calibration-unit", choices=("sequence", "token"), default="sequence",
                   help="the bound's trials: tokens as independent (token) or the effective sample size of "
                        "correlated sequences (sequence, default)")
    e.add_argument("--exit-policy-file", help="a calibrated exit rule (JSON) to use, or where to save a new one "
                                              "(default MODEL/exit_calibration.json)")
    e.add_argument("--max-draft", type=positive_int, default=4, help="speculative: drafts per verification (default 4)")
    p.add_argument("--threads", type=positive_int, help="CPU intra-op threads (1 helps on a busy shared CPU)")
    add_compile_arg(p)
    add_precision_args(p)
    p.set_defaults(func=run)


EXIT_DEFAULTS = {"exit_threshold": 0.9, "exit_threshold_kind": "fixed", "exit_measure": "max_prob"}


def _check_args(args) -> None:
    """Flags that cannot work together or hold bad values: refused before the model loads."""
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise RecursaError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and not -2**63 <= args.seed < 2**64:
        raise RecursaError(f"--seed must be a 64-bit integer, got {args.seed}")
    if not math.isfinite(args.temperature):
        raise RecursaError(f"--temperature must be a finite number, got {args.temperature}")
    for i, prompt in enumerate(args.prompt):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:   # undecodable argv bytes arrive as lone surrogates
            raise RecursaError(f"--prompt number {i + 1} is not valid UTF-8 text") from None
    given = [name for name in (*EXIT_DEFAULTS, "target_agreement", "calibration_data", "exit_policy_file")
             if getattr(args, name) is not None]
    if given and args.exit_strategy is None:
        raise RecursaError(f"--{given[0].replace('_', '-')} needs --exit-strategy (copy, parallel or speculative)")
    _check_calibration_args(args)
    for name, default in EXIT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    kind, value = args.exit_threshold_kind, args.exit_threshold
    low = -1.0 if args.exit_measure == "saturation" else 0.0   # cosine similarity may be negative
    if kind == "free" and not 0 < value < 1:
        raise RecursaError(f"--exit-threshold is FREE's target agreement probability: it must be in (0, 1), got {value}")
    if args.exit_strategy == "speculative" and args.temperature > 0:
        raise RecursaError("--exit-strategy speculative is greedy only: use --temperature 0 (or --exit-strategy parallel)")
    if kind != "free" and not low <= value <= 1:
        raise RecursaError(f"--exit-threshold {value} with --exit-measure {args.exit_measure}: a confidence lies in "
                           f"[{low:g}, 1], so it would {'never' if value > 1 else 'always'} exit; give one in [{low:g}, 1]")


def _check_calibration_args(args) -> None:
    """--target-agreement / --exit-policy-file replace a threshold given by hand."""
    from recursa.engine.exit_replay import check_target

    args.measure_given = args.exit_measure is not None
    calibrated = args.target_agreement is not None or args.exit_policy_file is not None
    if calibrated and (args.exit_threshold is not None or args.exit_threshold_kind is not None):
        raise RecursaError("--target-agreement / --exit-policy-file choose the threshold: drop --exit-threshold "
                           "and --exit-threshold-kind")
    if args.calibration_data is not None and args.target_agreement is None:
        raise RecursaError("--calibration-data needs --target-agreement")
    if args.target_agreement is not None:
        check_target(args.target_agreement, args.calibration_delta)


def _check_length(args, model, tokenizer, texts: list[str]) -> None:
    """Prompt + --max-tokens must fit the model's max_seq_len (refused before anything runs)."""
    limit = model.cfg.max_seq_len
    for text in texts:
        n = len(tokenizer.encode(text))
        if n + args.max_tokens > limit:
            raise RecursaError(f"prompt ({n} tokens) + --max-tokens ({args.max_tokens}) exceeds the model's "
                               f"max_seq_len {limit}: at most {max(limit - n, 0)} new tokens")


def run(args) -> int:
    _check_args(args)
    from recursa.engine.llm import LLM
    from recursa.engine.sampling_params import SamplingParams

    from recursa.data.tokenizer import load_tokenizer

    model = _load(args)
    if not (Path(args.model) / "tokenizer.json").is_file():
        raise RecursaError(f"{args.model} has no tokenizer.json")
    tokenizer = load_tokenizer(args.model)
    texts = [_chat(p) if args.chat else p for p in args.prompt]
    _check_length(args, model, tokenizer, texts)
    exit_policy = _exit_policy(args, model) if args.exit_strategy is not None else None
    strategy = dict(exit_strategy=args.exit_strategy, max_draft=args.max_draft) if exit_policy is not None else {}
    llm = LLM(model, tokenizer, exit_policy=exit_policy, compile=args.compile, **strategy)
    if args.compile:
        llm.warm_up()
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k or 0, top_p=args.top_p or 1.0,
                            seed=args.seed, max_tokens=args.max_tokens)
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
    extra = (f", {stats['accepted_draft_tokens']}/{stats['draft_tokens']} drafts accepted"
             if args.exit_strategy == "speculative" else "")
    print(f"[{len(texts)} request{'s' if len(texts) > 1 else ''}, {n_tokens} tokens in {elapsed:.2f}s, "
          f"{n_tokens / max(elapsed, 1e-9):.1f} tok/s, {stats['tokens_per_stage_run']:.1f} tokens per stage run, "
          f"{stats['head_evals_per_token']:.2f} head evaluations per token{extra}]", file=sys.stderr)
    failed = [i + 1 for i in sorted(finished) if finished[i].finish_reason == "error"]
    if failed:
        raise RecursaError(f"prompt(s) {', '.join(map(str, failed))} failed inside the engine "
                           f"(non-finite logits or a failing step); the others completed")
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
    from recursa.engine.exit_policy import ExitPolicy
    from recursa.model.exit_classifier import load_exit_classifier
    from recursa.engine.thresholds import make_threshold
    from recursa.model.exits import ExitSpec

    kind, value = args.exit_threshold_kind, args.exit_threshold
    spec = ExitSpec.from_config(model.cfg)
    if not spec.depths:
        raise RecursaError(f"{args.model} has no exits (config exit_depths is empty): train it with "
                           f"`recursa train --exit-depths ...`")
    if args.target_agreement is not None or args.exit_policy_file is not None:
        return _calibrated_policy(args, model)
    threshold = (make_threshold("free", 1.0, zeta=value) if kind == "free"
                 else make_threshold(kind, value, max_steps=args.max_tokens))
    measure = load_exit_classifier(args.model, model) if args.exit_measure == "classifier" else args.exit_measure
    return ExitPolicy(spec, measure, threshold)


def _calibrated_policy(args, model):
    """The exit policy of a calibration: made now from --calibration-data, or read from the saved file."""
    from recursa.engine.calibration import CALIBRATION_FILE, Calibration, calibrate, describe
    from recursa.model.exit_classifier import load_exit_classifier

    path = Path(args.exit_policy_file or Path(args.model) / CALIBRATION_FILE)
    classifier = load_exit_classifier(args.model, model) if args.exit_measure == "classifier" else None
    if args.calibration_data is not None:
        cal = calibrate(model, args.calibration_data, args.target_agreement, args.calibration_delta,
                        classifier or args.exit_measure, sequences=args.calibration_sequences,
                        unit=args.calibration_unit)
        cal.save(path)
        print(f"[calibration saved to {path}]", file=sys.stderr)
    else:
        cal = Calibration.load(path)
        wanted = {"target agreement": args.target_agreement, "delta": args.calibration_delta if
                  args.target_agreement is not None else None, "measure": args.exit_measure if args.measure_given else None}
        have = {"target agreement": cal.target, "delta": cal.delta, "measure": cal.measure}
        for key, value in wanted.items():
            if value is not None and value != have[key]:
                raise RecursaError(f"{path} is calibrated for {key} {have[key]}, not {value}: pass --calibration-data "
                                   f"DIR to calibrate again")
        if cal.measure == "classifier" and classifier is None:
            classifier = load_exit_classifier(args.model, model)
    print(f"[{describe(cal)}]", file=sys.stderr)
    return cal.exit_policy(model, classifier)


def _chat(prompt: str) -> str:
    """ChatML, the format of SmolLM2-Instruct and most small instruct models."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
