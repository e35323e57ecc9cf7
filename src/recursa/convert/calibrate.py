"""Activation statistics of a vanilla model's projection inputs: the weights of an activation-aware LoRA init.

A relaxed recursive conversion (recursa.convert.recursive) gives each shared depth d low-rank
adapters for delta_d, the difference between the original layer's weight and the shared one.
Plain truncated SVD keeps the directions of delta_d with the largest *weight* norm; what matters
is the error in the layer's *output* on the inputs it actually sees, ||(delta_d - delta_r) x||.
With E = delta_d - delta_r and C = E[x x^T] the inputs' second moment,
E||E x||^2 = ||E C^(1/2)||_F^2, so the best rank-r approximation for the output is the truncated
SVD of delta_d @ C^(1/2) (the whitening of SVD-LLM, Wang et al. 2024; ASVD, Yuan et al. 2023,
scales by a per-channel statistic instead, i.e. a diagonal C). SmolLM2 is the case that needs it:
a few residual channels carry activations of ~1e4, and a weight-norm SVD spends no rank on them.

This module runs the ORIGINAL model on calibration tokens with forward hooks at every depth and
accumulates C (fp64) for the four distinct projection inputs of a Block:

- `attn_in`  (q/k/v) and `mlp_in` (gate/up): the normalised input x̂ = rmsnorm(h) *before* the
  norm gain, because recursive.py takes those deltas as functions of x̂ (the gains are tied too);
- `o_in` (o_proj: the attention output) and `down_in` (down_proj: silu(gate) * up) as they are.

`input_weights` returns C^(1/2) = Q diag(sqrt(λ)) (eigendecomposition, any square root gives the
same left singular vectors), with a small relative ridge so that it is invertible and full rank
stays exact. `calib_ids` turns a prepared corpus (its train split, so the val split stays unseen)
or an id tensor into windows.

    ids = calib_ids("data/corpus-smollm", model, n_tokens=8192)
    weights = input_weights(model, ids, depths=range(model.depth))   # {depth: {input: [in, in]}}
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from recursa.errors import RecursaError

PROJ_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
              "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
DEFAULT_TOKENS = 8192
RIDGE = 1e-6  # of the mean eigenvalue: keeps C^(1/2) invertible where a channel never fires


def calib_ids(calib, model, n_tokens: int = DEFAULT_TOKENS, seq_len: int = 512) -> torch.Tensor:
    """[B, T] calibration windows: the first n_tokens of a prepared corpus's train split, or of an id tensor."""
    if n_tokens < 1:
        raise RecursaError(f"calibration needs at least 1 token, not {n_tokens}")
    if isinstance(calib, (str, os.PathLike)):
        from recursa.data.packed import read_header, read_tokens

        tokens = read_tokens(calib, "train")
        vocab = read_header(calib, "train")["vocab_size"]
        if vocab != model.cfg.vocab_size:
            raise RecursaError(f"calibration corpus {calib} has vocab {vocab}, the model {model.cfg.vocab_size}: "
                               "prepare one with the model's tokenizer (recursa data prepare --tokenizer MODEL)")
        ids = torch.from_numpy(tokens[:n_tokens].astype("int64"))
    elif isinstance(calib, torch.Tensor) and not calib.is_floating_point() and not calib.is_complex():
        ids = calib.reshape(-1)[:n_tokens].long()
    else:
        raise RecursaError(f"calib must be a prepared corpus directory or an integer id tensor, "
                           f"not {type(calib).__name__}")
    if ids.numel() == 0:
        raise RecursaError("the calibration set is empty")
    if int(ids.min()) < 0 or int(ids.max()) >= model.cfg.vocab_size:
        raise RecursaError(f"calibration ids must lie in [0, {model.cfg.vocab_size}); got "
                           f"[{int(ids.min())}, {int(ids.max())}]")
    seq_len = min(seq_len, model.cfg.max_seq_len, ids.numel())
    n = ids.numel() // seq_len * seq_len  # whole windows only (at least one)
    return ids[:n].view(-1, seq_len)


@torch.no_grad()
def input_moments(model, ids: torch.Tensor, depths, batch_size: int = 4) -> dict[int, dict[str, torch.Tensor]]:
    """{depth: {input: E[x x^T] (fp64)}} of every projection input at `depths`, from running `model` on ids."""
    depths = sorted(set(depths))
    sums = {d: {} for d in depths}

    def add(d: int, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        sums[d][name] = sums[d].get(name, 0) + x.t() @ x

    def normed(d: int, name: str, norm):
        return lambda _m, args: add(d, name, F.rms_norm(args[0].float(), args[0].shape[-1:], eps=norm.eps))

    def raw(d: int, name: str):
        return lambda _m, args: add(d, name, args[0])

    handles = []
    for d in depths:
        block = model.stage(d)
        handles += [block.attn_norm.register_forward_pre_hook(normed(d, "attn_in", block.attn_norm)),
                    block.mlp_norm.register_forward_pre_hook(normed(d, "mlp_in", block.mlp_norm)),
                    block.attn.o_proj.register_forward_pre_hook(raw(d, "o_in")),
                    block.mlp.down_proj.register_forward_pre_hook(raw(d, "down_in"))]
    try:
        was_training = model.training
        model.eval()
        ids = ids.to(model.embed_tokens.weight.device)
        for i in range(0, ids.shape[0], batch_size):
            model(ids[i:i + batch_size])
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    n = ids.numel()
    return {d: {name: s / n for name, s in per.items()} for d, per in sums.items()}


def square_root(moment: torch.Tensor) -> torch.Tensor:
    """W with W W^T = C + ridge * mean(eig) * I: the input weight of LoRA.svd_init_."""
    lam, Q = torch.linalg.eigh(moment.double())
    lam = lam.clamp_min(0) + RIDGE * lam.clamp_min(0).mean()
    return Q * lam.sqrt()[None, :]


def input_weights(model, ids: torch.Tensor, depths, batch_size: int = 4) -> dict[int, dict[str, torch.Tensor]]:
    """{depth: {input: C^(1/2)}}: see the module docstring."""
    return {d: {name: square_root(c) for name, c in per.items()}
            for d, per in input_moments(model, ids, depths, batch_size).items()}


__all__ = ["calib_ids", "input_moments", "input_weights", "square_root", "PROJ_INPUT", "DEFAULT_TOKENS"]
