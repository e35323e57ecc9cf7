"""`recursa serve MODEL_DIR`: an OpenAI-compatible HTTP server (completions, chat, streaming).

    recursa serve models/smollm2-135m                          # http://127.0.0.1:8000/v1
    recursa serve models/smollm2-135m --port 8080 --api-key "$KEY" --max-num-seqs 64 --threads 2
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'

vLLM's flag names. One engine thread batches every client's tokens depth-wise (recursa.serve);
beyond --max-num-seqs running and --max-queue-len waiting requests the server answers 429.
SIGTERM or Ctrl-C stop accepting, let running requests finish for up to --drain-timeout seconds,
then exit. The API key (--api-key or $RECURSA_API_KEY) is never logged. Needs the `serve` extra
(scripts/setup.sh installs it).
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

from recursa.cli import add_compile_arg, positive_int
from recursa.model.confidence import CHOICES as MEASURE_CHOICES
from recursa.engine.config import POLICIES
from recursa.errors import RecursaError


def _positive_float(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API", description=__doc__)
    p.add_argument("model", help="model directory (model.safetensors + config.json + tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 (default $RECURSA_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: the directory name)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="requests running at once (default 256)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=1024, help="tokens per stage run")
    p.add_argument("--max-model-len", type=positive_int, default=None, help="prompt + output tokens (default: the model's)")
    p.add_argument("--kv-cache-memory-bytes", type=positive_int, default=None, help="bytes for all KV blocks")
    p.add_argument("--policy", choices=POLICIES, default="depthwise", help="which stage runs next (engine/policy.py)")
    p.add_argument("--max-queue-len", type=int, default=256, help="requests waiting beyond the running ones; more get 429")
    p.add_argument("--request-timeout", type=_positive_float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--drain-timeout", type=_positive_float, default=30.0,
                   help="on SIGTERM, seconds to let running requests finish (default 30)")
    p.add_argument("--allowed-origins", action="append", default=[], help="enable CORS for this origin (repeatable)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    e = p.add_argument_group("early exit (a model with exits; parallel decoding: exact KV at any batch size)")
    e.add_argument("--exit-strategy", choices=("parallel",), help="turn on early exit at the model's exits")
    e.add_argument("--exit-threshold", type=float, default=0.9, help="exit when confidence >= this (free: ζ)")
    e.add_argument("--exit-threshold-kind", choices=("fixed", "calm", "free"), default="fixed")
    e.add_argument("--exit-measure", choices=MEASURE_CHOICES, default="max_prob")
    p.add_argument("--threads", type=positive_int, help="CPU intra-op threads")
    add_compile_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        import uvicorn

        from recursa.serve.app import build_app
        from recursa.serve.chat import ChatTemplate
    except ImportError as e:
        raise RecursaError(f"the server needs the `serve` extra ({e.name} is missing): pip install -e '.[serve]'") from None
    from recursa.cli.generate import _exit_policy
    from recursa.data.tokenizer import load_tokenizer
    from recursa.engine.llm import LLM
    from recursa.model import load

    if args.max_queue_len < 0:
        raise RecursaError(f"--max-queue-len must be >= 0, got {args.max_queue_len}")
    if not 0 <= args.port <= 65535:
        raise RecursaError(f"--port must be in 0..65535, got {args.port}")
    directory = Path(args.model)
    model = load(directory)
    if not (directory / "tokenizer.json").is_file():
        raise RecursaError(f"{directory} has no tokenizer.json (the server needs text in and out)")
    args.max_tokens = args.max_model_len or model.cfg.max_seq_len   # the horizon of a step-decaying (calm) threshold
    exit_policy = _exit_policy(args, model) if args.exit_strategy else None
    llm = LLM(model, load_tokenizer(directory), exit_policy=exit_policy, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              kv_cache_memory=args.kv_cache_memory_bytes, policy=args.policy, compile=args.compile)
    if args.compile:
        print("recursa serve: compiling (warm-up of every step kind) ...", flush=True)
        llm.warm_up()
    template = ChatTemplate.from_dir(directory)
    name = args.served_model_name or directory.resolve().name
    app = build_app(llm, model_name=name, chat_template=template,
                    api_key=args.api_key or os.environ.get("RECURSA_API_KEY") or None,
                    max_queue_len=args.max_queue_len, request_timeout=args.request_timeout,
                    allowed_origins=args.allowed_origins)
    note = " (no chat template in the model directory: ChatML)" if template.fallback else ""
    print(f"recursa serve: {name} on http://{args.host}:{args.port}/v1{note}", flush=True)
    # uvicorn drains on SIGTERM, then re-raises it under the handler it found: make that a no-op,
    # so that a drained server exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.drain_timeout)
    return 0
