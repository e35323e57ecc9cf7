"""Convert a pretrained L-layer model into a (Relaxed) Recursive Transformer of the same depth.

The recursive model keeps depth L = K * n_loops (+ 2 for middle_*) and ties its depths onto K
shared layers (recursa.model.sharing). Depth d of the result corresponds to layer d of the
original. Embeddings, final norm and LM head are copied; middle_* prelude/coda layers are the
original first/last layers. Shared layer k (k = 0..K-1, in order of first use) is initialised by:

- `stepwise`: original layer base + k * n_loops (every n_loops-th layer of the shared span), the
  last slot taking the span's last layer, so the first and last layers are both kept;
- `average`:  the mean of the original layers at the depths tied to slot k;
- `lower`:    original layer base + k (the first K layers of the span);
- `random`:   the decoder's fresh initialisation (seeded) for every layer, prelude/coda included;
  embeddings, final norm and head are still copied. The baseline.
(base = 1 for middle_*, else 0.)

Relaxed (lora ranks > 0): at shared depth d (unique layer u) each adapter starts from the
truncated SVD of the difference between what the original layer computes and what the shared
one does. The norm gains differ too (they are tied with the layer), so for the projections that
read a normalised input x = g ⊙ x̂ (q/k/v after attn_norm, gate/up after mlp_norm) the difference
is taken as a function of x̂: W_d diag(g_d) − W_u diag(g_u), and A is divided by g_u column-wise
after the SVD; for o/down it is W_d − W_u. At full rank the relaxed model therefore computes the
original function (tested to 1e-4 in fp32, SmolLM2-135M included). A shared norm gain of
exactly zero is rejected. At lower rank `lora_init` chooses what "best" means:

- `svd`:  plain truncated SVD, the best rank-r approximation of the delta's weights;
- `asvd`: activation-aware, the best rank-r approximation of the delta's *outputs* on the
  original model's own inputs at that depth, measured on `calib` (a prepared corpus directory,
  its train split, or an id tensor; first `calib_tokens` tokens): see recursa.convert.calibrate.
  Both are exact at full rank.

    model = to_recursive(load("models/smollm2-135m"), "cycle", n_loops=3, init="stepwise")
    recursa convert --recursive models/smollm2-135m --out models/smol-10x3 --sharing cycle --loops 3
    recursa convert --recursive models/smollm2-135m --out models/smol-15x2-r64 --loops 2 --lora-rank 64 \
        --lora-init asvd --calib data/corpus-smollm

`merge(model)`: a vanilla Decoder with every depth's weight materialised as W_u + scale * B A
(unmerged inference is the model itself; the two agree to float rounding).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from recursa.config import ConfigError
from recursa.convert import calibrate
from recursa.errors import RecursaError
from recursa.model import Decoder, load
from recursa.model.lora import module_of
from recursa.model.sharing import Structure

INITS = ("stepwise", "average", "lower", "random")
LORA_INITS = ("svd", "asvd")
_NORM_OF = {"q_proj": "attn_norm", "k_proj": "attn_norm", "v_proj": "attn_norm",
            "gate_proj": "mlp_norm", "up_proj": "mlp_norm"}


def load_source(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Decoder:
    """A recursa model directory, or a HuggingFace Llama directory (imported on the fly)."""
    directory = Path(path)
    config = directory / "config.json"
    if config.is_file():
        try:
            is_hf = "model_type" in json.loads(config.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RecursaError(f"cannot read {config}: {e}") from None
        if is_hf:
            from recursa.convert.hf import from_hf

            return from_hf(directory, dtype=dtype)
    return load(directory, dtype=dtype)


def init_sources(s: Structure, init: str) -> dict[int, list[int]]:
    """Unique layer -> the original layers whose mean initialises it ({} entries: random)."""
    if init not in INITS:
        raise RecursaError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
    if init == "random":
        return {}
    sources = {s.depth_to_layer[d]: [d] for d in s.prelude + s.coda}
    base, span, k_total, n = (s.shared[0], len(s.shared), len(s.shared_layers), s.n_loops)
    for k, u in enumerate(s.shared_layers):
        if init == "stepwise":
            sources[u] = [base + span - 1 if (k == k_total - 1 and k_total > 1) else base + k * n]
        elif init == "lower":
            sources[u] = [base + k]
        else:  # average
            sources[u] = list(s.depths_of_layer(u))
    return sources


def _lora_target(orig: dict, shared: dict, proj: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(delta, in_scale): what the adapter at one depth must add, as a function of its input / in_scale.

    For projections that read a normalised input x = g ⊙ x̂ the norm gains differ per depth too,
    so the delta is taken on x̂: W_d diag(g_d) − W_u diag(g_u), with in_scale = g_u.
    """
    name = f"{module_of(proj)}.{proj}.weight"
    w_orig, w_shared = orig[name].double(), shared[name].double()
    if proj not in _NORM_OF:
        return w_orig - w_shared, None
    norm = f"{_NORM_OF[proj]}.weight"
    g_orig, g_shared = orig[norm].double(), shared[norm].double()
    if bool((g_shared == 0).any()):
        raise RecursaError(f"the shared {_NORM_OF[proj]} gain has zeros: a relaxed init cannot "
                           "reproduce the original gains through the adapters")
    return w_orig * g_orig[None, :] - w_shared * g_shared[None, :], g_shared


@torch.no_grad()
def to_recursive(model: Decoder, sharing: str, n_loops: int, init: str = "stepwise", lora_rank_attn: int = 0,
                 lora_rank_mlp: int = 0, lora_alpha: float | None = None, seed: int = 0, lora_init: str = "svd",
                 calib=None, calib_tokens: int = calibrate.DEFAULT_TOKENS) -> Decoder:
    """A recursive (relaxed when a rank > 0) Decoder of the same depth initialised from `model`.

    lora_init="asvd" needs `calib` (a prepared corpus directory or an id tensor) and runs `model`
    on its first `calib_tokens` tokens once; strict conversions ignore both."""
    if lora_init not in LORA_INITS:
        raise RecursaError(f"unknown lora_init {lora_init!r}; choose from {', '.join(LORA_INITS)}")
    if lora_init == "asvd" and calib is None:
        raise RecursaError("lora_init='asvd' needs calibration tokens: calib=<prepared corpus dir or id tensor>")
    if model.cfg.sharing != "none":
        raise RecursaError(f"the source model already shares layers (sharing={model.cfg.sharing!r}); "
                           "convert a vanilla model")
    if init not in INITS:
        raise RecursaError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
    if sharing == "none":
        raise RecursaError("sharing must be one of cycle, sequence, middle_cycle, middle_sequence")
    try:
        cfg = model.cfg.replace(sharing=sharing, n_loops=n_loops, lora_rank_attn=lora_rank_attn,
                                lora_rank_mlp=lora_rank_mlp, lora_alpha=lora_alpha)
    except ConfigError as e:
        raise RecursaError(f"cannot convert a {model.cfg.n_layers}-layer model: {e}") from None
    dtype = model.embed_tokens.weight.dtype
    torch.manual_seed(seed)
    out = Decoder(cfg).to(dtype)  # fresh init: kept by `random`, LoRA B = 0
    src = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = out.state_dict()
    for name in state:
        if not name.startswith(("layers.", "lora.")):
            state[name] = src[name].clone()
    original = [{n.split(".", 2)[2]: t for n, t in src.items() if n.startswith(f"layers.{i}.")}
                for i in range(model.cfg.n_layers)]
    s = out.structure()
    for u, layers in init_sources(s, init).items():
        for name in original[0]:
            mean = torch.stack([original[i][name].double() for i in layers]).mean(0)
            state[f"layers.{u}.{name}"] = mean.to(dtype)
    out.load_state_dict(state, strict=True)
    if out.lora is not None:
        shared = [{n: t.detach().cpu() for n, t in block.state_dict().items()} for block in out.layers]
        weights = {}
        if lora_init == "asvd":
            ids = calibrate.calib_ids(calib, model, calib_tokens)
            weights = calibrate.input_weights(model, ids, s.shared)
        for d in s.shared:
            for proj, adapter in out.adapters(d).items():
                adapter.svd_init_(*_lora_target(original[d], shared[s.depth_to_layer[d]], proj),
                                  in_weight=weights.get(d, {}).get(calibrate.PROJ_INPUT[proj]))
    return out.eval()




@torch.no_grad()
def merge(model: Decoder) -> Decoder:
    """A vanilla Decoder computing what `model` computes, one materialised Block per depth."""
    cfg = model.cfg.replace(sharing="none", n_loops=1, lora_rank_attn=0, lora_rank_mlp=0, lora_alpha=None)
    w = model.embed_tokens.weight
    with torch.device("meta"):
        merged = Decoder(cfg)
    state = {}
    for name, t in model.state_dict().items():
        if not name.startswith(("layers.", "lora.")):
            state[name] = t.clone()
    for d in range(model.depth):
        adapters = model.adapters(d)
        for name, t in model.stage(d).state_dict().items():
            proj = name.split(".")[1] if "." in name else None
            if adapters is not None and proj in adapters:
                t = t + adapters[proj].delta_weight().to(t.dtype)
            state[f"layers.{d}.{name}"] = t.clone()
    merged.load_state_dict(state, strict=True, assign=True)
    merged.inv_freq = model.inv_freq.clone()
    return merged.to(device=w.device).train(model.training)


__all__ = ["to_recursive", "init_sources", "load_source", "merge", "INITS", "LORA_INITS"]
