"""One engine of the peer benchmark, in its own process: `benchmarks/peers.py` starts one per
(engine, precision), each with the interpreter of the engine's own virtualenv, and talks to it over
stdin/stdout. This file imports nothing of recursa at module level, so it runs in any of them.

Protocol: the worker loads the model, warms up, prints `@@peers {"ready": ...}`; then, per line of
stdin `{"prompts": [[ids]], "concurrent": bool, "new_tokens": n}`, it generates greedily (exactly n
tokens per prompt, end of sequence ignored) either one prompt at a time or all prompts at once,
and prints `@@peers {"seconds", "cpu_seconds", "outputs"}`. Other stdout lines (library chatter)
are ignored by the parent. An empty line or EOF ends it.

    python benchmarks/peers_worker.py --engine hf --precision fp32 --model HF_DIR --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

MARK = "@@peers "


def reply(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


# ---- engines: load(args) -> generate(prompts, concurrent, n) -> list of token-id lists ------------
def recursa_engine(args, compile: bool = False):
    import torch

    import recursa
    from recursa import SamplingParams

    torch.set_num_threads(args.threads)
    kwargs = {"fp32": {}, "bf16": {"dtype": "bfloat16"},
              "int8": {"dtype": "bfloat16", "quantization": "int8"},
              "int4": {"dtype": "bfloat16", "quantization": "int4"},
              "int4h8": {"dtype": "bfloat16", "quantization": "int4", "head_quantization": "int8"}}[args.precision]
    try:
        llm = recursa.LLM(args.model, max_num_seqs=args.concurrency, max_num_batched_tokens=1024, compile=compile,
                          **kwargs)
    except TypeError as e:  # an engine without LLM(dtype=..., quantization=...)
        raise SystemExit(f"unsupported: this recursa has no LLM({', '.join(kwargs)}=...) ({e})")

    def generate(prompts, concurrent, n):
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        if concurrent:
            return [o.token_ids for o in llm.generate(prompts, sp)]
        return [llm.generate([p], sp)[0].token_ids for p in prompts]
    generate.llm = llm
    return generate, {"recursa": recursa.__version__ if hasattr(recursa, "__version__") else "?",
                      "torch": torch.__version__}


def hf_engine(args):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()

    @torch.inference_mode()
    def run(batch, n):
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
        return out[:, width:].tolist()

    def generate(prompts, concurrent, n):
        return run(prompts, n) if concurrent else [run([p], n)[0] for p in prompts]
    return generate, {"transformers": transformers.__version__, "torch": torch.__version__}


def vllm_engine(args):
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.model, dtype={"fp32": "float32", "bf16": "bfloat16"}[args.precision],
              max_model_len=512, max_num_seqs=args.concurrency, seed=0)

    def generate(prompts, concurrent, n):
        sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        batches = [prompts] if concurrent else [[p] for p in prompts]
        outs = []
        for batch in batches:
            res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], sp, use_tqdm=False)
            outs += [list(r.outputs[0].token_ids) for r in res]
        return outs
    return generate, {"vllm": vllm.__version__, "torch": torch.__version__}


def llama_engine(args):
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    if os.environ.get("RECURSA_LLAMA_EXTRA_BUFTS") != "1":
        # The source build's extra buffer types (AMX / repacked weights) crash in llama_decode on this
        # Sapphire Rapids CPU (segfault, llama-cpp-python 0.3.36, GGML_NATIVE=ON); plain CPU buffers work.
        defaults = lib.llama_model_default_params

        def params():
            p = defaults()
            p.use_extra_bufts = False
            return p
        lib.llama_model_default_params = params
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=512, n_batch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, seed=0, verbose=False)

    def one(prompt, n):
        out = []
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if len(out) == n:
                return out
        return out

    def generate(prompts, concurrent, n):
        if concurrent:  # llama-cpp-python's Llama decodes one sequence at a time
            raise SystemExit("unsupported: llama-cpp-python's Llama runs one sequence at a time")
        return [one(p, n) for p in prompts]
    return generate, {"llama_cpp": llama_cpp.__version__}


ENGINES = {"recursa": recursa_engine, "recursa-tc": lambda args: recursa_engine(args, compile=True), "hf": hf_engine, "vllm": vllm_engine, "llama.cpp": llama_engine}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=sorted(ENGINES), required=True)
    ap.add_argument("--precision", required=True)
    ap.add_argument("--model", required=True, help="model directory (recursa/HF) or GGUF file (llama.cpp)")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--warmup", default="[]", help="JSON list of prompts for the warm-up")
    args = ap.parse_args()
    t0 = time.perf_counter()
    try:
        generate, versions = ENGINES[args.engine](args)
        warm = json.loads(args.warmup)
        if warm:  # a sequence alone and a full batch: compiled/cached paths for both shapes
            generate(warm[:1], False, 4)
            if args.engine != "llama.cpp":
                generate(warm, True, 4)
            if args.engine == "recursa-tc":   # every step kind's graph (recursa.LLM.warm_up) ...
                generate.llm.warm_up()
                generate(warm * 3, True, 4)     # ... and a batch past the kernels' row limit
    except SystemExit as e:
        reply({"error": str(e)})
        return
    except Exception as e:  # noqa: BLE001 - report any load failure as one line to the parent
        reply({"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
        return
    reply({"ready": True, "load_seconds": time.perf_counter() - t0, "versions": versions, "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            break
        req = json.loads(line)
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            outs = generate(req["prompts"], req["concurrent"], req["new_tokens"])
        except SystemExit as e:
            reply({"error": str(e)})
            continue
        reply({"seconds": time.perf_counter() - w0, "cpu_seconds": time.process_time() - c0, "outputs": outs})


if __name__ == "__main__":  # vLLM starts worker processes: its setup must not run again on import
    main()
