"""SmolLM2-135M in recursa at full precision and int4, next to HF transformers `generate`: speed and perplexity.

The demo's one-minute look at the engine (the full peer table with vLLM and llama.cpp is
benchmarks/peers.py). Same weights, same random prompts, greedy, --new-tokens each; batch 1 (one
request at a time) and --concurrent requests at once; perplexity of each precision on the first
--ppl-tokens tokens of the validation split. Prints a table, then one JSON line.

    .venv/bin/python benchmarks/demo_speed.py --model models/smollm2-135m --data data/corpus-smollm
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import torch


def _recursa(model_dir, quantization, prompts, new_tokens, concurrent):
    from recursa import LLM, SamplingParams

    llm = LLM(model_dir, quantization=quantization, max_num_seqs=concurrent)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=2))
    t = time.perf_counter()
    for p in prompts[:2]:
        llm.generate(p, params)
    one = 2 * new_tokens / (time.perf_counter() - t)
    t = time.perf_counter()
    outs = llm.generate(prompts[:concurrent], params)
    many = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
    return llm.model, one, many


def _hf(hf_dir, prompts, new_tokens, concurrent):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def gen(batch):
        width = max(map(len, batch))   # left padding, as HF generate wants for a batch
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, pad_token_id=0)
        return len(batch) * new_tokens

    gen(prompts[:1])
    t = time.perf_counter()
    n = sum(gen([p]) for p in prompts[:2])
    one = n / (time.perf_counter() - t)
    t = time.perf_counter()
    many = gen(prompts[:concurrent]) / (time.perf_counter() - t)
    return one, many


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/smollm2-135m")
    ap.add_argument("--data", default="data/corpus-smollm", help="a corpus prepared with SmolLM2's tokenizer")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from recursa.convert.hf import to_hf
    from recursa.data.packed import read_tokens
    from recursa.eval.perplexity import perplexity
    from recursa.model import load

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(8, 48))] for _ in range(args.concurrent)]
    tokens = read_tokens(args.data, "val")
    rows = []
    for name, quant in (("recursa fp32", None), ("recursa int4", "int4")):
        model, one, many = _recursa(args.model, quant, prompts, args.new_tokens, args.concurrent)
        ppl = perplexity(model, tokens, seq_len=512, max_tokens=args.ppl_tokens)["ppl"]
        rows.append({"engine": name, "batch1_tok_s": one, "concurrent_tok_s": many, "ppl": ppl})
    with tempfile.TemporaryDirectory() as hf_dir:
        to_hf(load(args.model), hf_dir, force=True)
        one, many = _hf(hf_dir, prompts, args.new_tokens, args.concurrent)
    rows.append({"engine": "HF generate fp32", "batch1_tok_s": one, "concurrent_tok_s": many, "ppl": rows[0]["ppl"]})
    print(f"SmolLM2-135M, {args.new_tokens} new tokens, greedy, {torch.get_num_threads()} threads")
    print(f"{'engine':18s} {'batch 1 tok/s':>14s} {f'{args.concurrent} concurrent':>14s} {'perplexity':>11s}")
    for r in rows:
        print(f"{r['engine']:18s} {r['batch1_tok_s']:14.1f} {r['concurrent_tok_s']:14.1f} {r['ppl']:11.2f}")
    print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
