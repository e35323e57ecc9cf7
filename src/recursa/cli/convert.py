"""`recursa convert`: turn one model directory into another, one mode flag per conversion.

    recursa convert --from-hf path/to/llama --out models/llama      # HF Llama -> recursa
    recursa convert --to-hf models/llama --out exported/llama       # recursa -> HF Llama

The output directory is written next to its final place and renamed into it, so it is either
complete or absent; an existing one is kept unless `--force`. Tokenizer files travel along.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from recursa.errors import RecursaError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert between recursa and HuggingFace model directories",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--from-hf", metavar="DIR", help="a local LlamaForCausalLM directory to import")
    mode.add_argument("--to-hf", metavar="MODEL_DIR", help="a recursa model directory to export")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, DTYPES[name])


def _from_hf(args) -> str:
    from recursa.convert.hf import copy_tokenizer, from_hf, staged_dir

    model = from_hf(args.from_hf, dtype=_dtype(args.dtype))
    with staged_dir(args.out, args.force) as tmp:
        model.save(tmp)
        copied = copy_tokenizer(args.from_hf, tmp)
    return f"{model.num_params() / 1e6:.1f}M parameters" + (" + tokenizer" if copied else "")


def _to_hf(args) -> str:
    from recursa.convert.hf import to_hf
    from recursa.model import load

    model = load(args.to_hf, dtype=_dtype(args.dtype))
    to_hf(model, args.out, tokenizer_dir=args.to_hf, force=args.force)
    tokenizer = " + tokenizer" if (Path(args.out) / "tokenizer.json").is_file() else ""
    return f"{model.num_params() / 1e6:.1f}M parameters as LlamaForCausalLM{tokenizer}"


MODES = {"from_hf": _from_hf, "to_hf": _to_hf}


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise RecursaError(f"{out} already exists (pass --force to overwrite)")
    mode = next(name for name in MODES if getattr(args, name) is not None)
    summary = MODES[mode](args)
    print(f"wrote {out}: {summary}")
    return 0
