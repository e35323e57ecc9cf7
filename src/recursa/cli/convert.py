"""`recursa convert`: turn one model directory into another, one mode flag per conversion.

    recursa convert --from-hf path/to/llama --out models/llama      # HF Llama -> recursa
    recursa convert --to-hf models/llama --out exported/llama       # recursa -> HF Llama
    recursa convert --recursive models/smollm2-135m --out models/smol-10x3 \
        --sharing cycle --loops 3 --init stepwise [--lora-rank 64]  # -> (relaxed) recursive model
    recursa convert --recursive models/smollm2-135m --out models/smol-15x2-r64 --loops 2 \
        --lora-rank 64 --lora-init asvd [--calib data/corpus-smollm]  # activation-aware LoRA init

The output directory is written next to its final place and renamed into it, so it is either
complete or absent; an existing one is kept unless `--force`. Tokenizer files travel along.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from recursa.errors import RecursaError
from recursa.io import check_output_dir

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert between recursa and HuggingFace model directories",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--from-hf", metavar="DIR", help="a local LlamaForCausalLM directory to import")
    mode.add_argument("--to-hf", metavar="MODEL_DIR", help="a recursa model directory to export")
    mode.add_argument("--recursive", metavar="MODEL_DIR",
                      help="a recursa or HF Llama directory to convert into a recursive model of the same depth")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    r = p.add_argument_group("--recursive options (see recursa.convert.recursive)")
    r.add_argument("--sharing", choices=("cycle", "sequence", "middle_cycle", "middle_sequence"), default="cycle")
    r.add_argument("--loops", type=int, help="n_loops: passes through the shared block (required)")
    r.add_argument("--init", choices=("stepwise", "average", "lower", "random"), default="stepwise")
    r.add_argument("--lora-rank", type=int, default=0, help="relaxed: LoRA rank for attention and MLP (0: strict)")
    r.add_argument("--lora-rank-attn", type=int, help="override --lora-rank for q/k/v/o")
    r.add_argument("--lora-rank-mlp", type=int, help="override --lora-rank for gate/up/down")
    r.add_argument("--lora-alpha", type=float, help="LoRA scale = alpha / rank (default: scale 1)")
    r.add_argument("--lora-init", choices=("svd", "asvd"), default="svd",
                   help="relaxed: truncated SVD of the weight residual (svd) or of its outputs on calibration "
                        "activations of the original model (asvd)")
    r.add_argument("--calib", metavar="DATA_DIR", default="data/corpus-smollm",
                   help="--lora-init asvd: a corpus prepared with the model's tokenizer (its train split; "
                        "default %(default)s)")
    r.add_argument("--calib-tokens", type=int, default=8192, help="--lora-init asvd: calibration tokens (default 8192)")
    r.add_argument("--seed", type=int, default=0, help="seed of the fresh weights (--init random)")
    p.set_defaults(func=run)


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, DTYPES[name])


def _from_hf(args) -> str:
    from recursa.convert.hf import copy_tokenizer, from_hf
    from recursa.io import staged_dir

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


def _recursive(args) -> str:
    from recursa.convert.hf import copy_tokenizer
    from recursa.io import staged_dir
    from recursa.convert.recursive import load_source, to_recursive

    if args.loops is None:
        raise RecursaError("--recursive needs --loops N (passes through the shared block)")
    attn = args.lora_rank if args.lora_rank_attn is None else args.lora_rank_attn
    mlp = args.lora_rank if args.lora_rank_mlp is None else args.lora_rank_mlp
    source = load_source(args.recursive, dtype=_dtype(args.dtype))
    model = to_recursive(source, args.sharing, args.loops, args.init, attn, mlp, args.lora_alpha, args.seed,
                         lora_init=args.lora_init, calib=args.calib, calib_tokens=args.calib_tokens)
    with staged_dir(args.out, args.force) as tmp:
        model.save(tmp)
        copied = copy_tokenizer(args.recursive, tmp)
    s, cfg = model.structure(), model.cfg
    relaxed = f", LoRA ranks attn {attn} / mlp {mlp} ({args.lora_init} init)" if attn or mlp else ""
    return (f"{model.num_params() / 1e6:.1f}M parameters (source {source.num_params() / 1e6:.1f}M), "
            f"{cfg.sharing} {len(s.prelude)} + {cfg.n_shared_layers}x{cfg.n_loops} + {len(s.coda)} layers, "
            f"init {args.init}{relaxed}" + (" + tokenizer" if copied else ""))


MODES = {"from_hf": _from_hf, "to_hf": _to_hf, "recursive": _recursive}


def run(args) -> int:
    out = check_output_dir(args.out)
    if out.exists() and not args.force:
        raise RecursaError(f"{out} already exists (pass --force to overwrite)")
    mode = next(name for name in MODES if getattr(args, name) is not None)
    summary = MODES[mode](args)
    print(f"wrote {out}: {summary}")
    return 0
