"""Relaxed recursion: a low-rank adapter per (shared depth, projection) on top of the tied weights.

At a shared depth d running unique layer u, every projection computes

    y = W_u x + scale * B_d (A_d x),        scale = lora_alpha / rank  (1 when lora_alpha is None)

so tokens at different loops still share W_u (and batch together) while each loop gets its own
small correction. Projections: attention q/k/v/o (rank `lora_rank_attn`) and MLP gate/up/down
(rank `lora_rank_mlp`); a rank larger than a projection's smaller side is clipped to it (that is
full rank: any delta is representable). Rank 0 for a module type means no adapters there.

Adapters live in `Decoder.lora`, a ModuleDict keyed by the depth (as a string), so
`forward_stage(depth, ...)` picks its adapters by depth and the stage API is unchanged.

- `svd_init_`: set one adapter from the rank-r truncated SVD of a target delta, divided by the
  scale, so that scale * B @ A is the best rank-r approximation of the delta (and exact at full
  rank). Forgetting to divide by the scale would multiply the delta by alpha / r.
- merging the adapters into plain weights is a conversion: `recursa.convert.recursive.merge`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from recursa.config import ModelConfig

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every adapted projection."""
    q, kv, d, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.dim, cfg.ffn_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def module_of(proj: str) -> str:
    """Where a projection lives inside a Block: 'attn' or 'mlp'."""
    return "attn" if proj in ATTN_PROJ else "mlp"


class LoRA(nn.Module):
    """delta(x) = scale * B (A x); A [rank, in], B [out, rank]."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.scale = scale
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # B = 0: a fresh adapter leaves the shared layer unchanged.
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.t()) @ self.B.t() * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale

    @torch.no_grad()
    def svd_init_(self, delta: torch.Tensor, in_scale: torch.Tensor | None = None,
                  in_weight: torch.Tensor | None = None) -> None:
        """Set scale * B @ A to the best rank-r approximation of `delta` [out, in] (computed in fp64).

        in_scale [in] (optional): the adapter's input is x = in_scale * x̂ and `delta` is the
        wanted change as a function of x̂, so A is divided by in_scale column-wise after the SVD.
        (Decomposing delta / in_scale instead would let one tiny gain blow up every column's error.)

        in_weight [in, in] (optional): best in ||(delta - scale B A) in_weight||_F instead of the
        plain Frobenius norm; with in_weight = C^(1/2) of the inputs' second moment C that is the
        mean output error on those inputs (recursa.convert.calibrate). The SVD is taken of
        delta @ in_weight; with U_r its top-r left singular vectors, scale B A = U_r U_r^T delta,
        which needs no inverse of in_weight and is delta itself at full rank.
        """
        delta = delta.double()
        r = self.A.shape[0]
        U = torch.linalg.svd(delta if in_weight is None else delta @ in_weight.double(), full_matrices=False)[0][:, :r]
        P = U.t() @ delta  # [r, in]; rows S_i v_i^T for the plain SVD
        # split each direction's size evenly between A and B, undo the scale
        root = P.norm(dim=1).sqrt() / math.sqrt(self.scale)
        A = P / (root.clamp_min(1e-150)[:, None] * self.scale)
        if in_scale is not None:
            A = A / in_scale.double()[None, :]
        self.B.copy_(U * root)
        self.A.copy_(A)


def scale_for(cfg: ModelConfig, rank: int) -> float:
    return 1.0 if cfg.lora_alpha is None else cfg.lora_alpha / rank


def build(cfg: ModelConfig, shared_depths) -> nn.ModuleDict | None:
    """Adapters for each shared depth ({str(depth): {proj: LoRA}}), or None for a strict model."""
    if not (cfg.lora_rank_attn or cfg.lora_rank_mlp):
        return None
    adapters = nn.ModuleDict()
    for d in shared_depths:
        per_proj = nn.ModuleDict()
        for proj, (i, o) in projection_shapes(cfg).items():
            rank = cfg.lora_rank_attn if module_of(proj) == "attn" else cfg.lora_rank_mlp
            if rank:
                per_proj[proj] = LoRA(i, o, min(rank, i, o), scale_for(cfg, rank))
        adapters[str(d)] = per_proj
    return adapters


__all__ = ["LoRA", "build", "projection_shapes", "module_of", "scale_for", "ATTN_PROJ", "MLP_PROJ"]
