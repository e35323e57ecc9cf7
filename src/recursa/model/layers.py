"""Llama-style building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Every module is stateless: keys/values come in and go out as plain tensors, so the same block
serves the training forward (no cache) and the batching engine.
`lora` (optional, relaxed recursive models): a mapping projection name -> module whose output is
added to that projection's (see recursa.model.lora); None runs the plain weights.
`fuse()` (Attention, MLP, Block; inference only) replaces q/k/v by one `qkv_proj` and gate/up by
one `gate_up_proj`, so each is one matmul; outputs are split back per projection (LoRA adapters
still add to each part). Training, checkpoints and HF conversion use the unfused names: fuse after
loading, never before saving.
Shapes: x [B, T, D]; q [B, H, T, hd]; k, v [B, Hkv, T, hd]; cos, sin [B or 1, T, hd].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recursa import kernels
from recursa.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """weight * x / rms(x), the normalisation in fp32 (HF Llama's order of operations).

        One dispatch in fp32 (F.rms_norm's fused gain gives the same bits as weight * rms_norm(x));
        bf16/fp16 inputs are normalised in fp32 inside F.rms_norm (the same bits as an explicit
        x.float() ... .to(dtype)), then scaled in the input dtype, as HF does."""
        if self.weight.dtype == x.dtype and kernels.supports_elementwise(x):
            return kernels.rms_norm(x, self.weight, self.eps)   # one pass (bf16: the same two roundings)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self.weight, eps=self.eps)
        if x.dtype in (torch.bfloat16, torch.float16):
            return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin for integer positions [T] or [B, T] -> [1 or B, T, head_dim] (computed in fp32)."""
    if positions.dim() == 1:
        positions = positions[None]
    freqs = positions.float()[..., None] * inv_freq.float()[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; cos/sin [B or 1, T, hd] or already [B or 1, 1, T, hd] (the engine's, shaped
    once per span: two dispatches fewer per call)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


def _project(proj: nn.Linear, name: str, x: torch.Tensor, lora) -> torch.Tensor:
    y = proj(x)
    return y if lora is None or name not in lora else y + lora[name](x)


def _project_fused(proj: nn.Module, names: tuple[str, ...], sizes: list[int], x: torch.Tensor, lora):
    """One matmul for several projections of the same input, split back; each part gets its adapter."""
    parts = proj(x).split(sizes, dim=-1)
    if lora is None:
        return parts
    return tuple(y + lora[n](x) if n in lora else y for y, n in zip(parts, names))


def _fused_linear(*projs: nn.Linear) -> nn.Linear:
    """An nn.Linear whose output is the concatenation of `projs`' outputs (same input)."""
    w = torch.cat([p.weight.detach() for p in projs], dim=0)
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    fused.weight = nn.Parameter(w, requires_grad=False)
    return fused


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask (True = attend) for the last q_len of kv_len positions."""
    offset = kv_len - q_len
    q = torch.arange(q_len, device=device)[:, None] + offset
    k = torch.arange(kv_len, device=device)[None, :]
    return k <= q


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.qkv_proj = None  # set by fuse()

    def fuse(self) -> None:
        """Inference transform: q/k/v become one matmul (`qkv_proj`); the separate weights go."""
        if self.qkv_proj is None:
            self.qkv_proj = _fused_linear(self.q_proj, self.k_proj, self.v_proj)
            del self.q_proj, self.k_proj, self.v_proj

    def _projections(self, x: torch.Tensor, lora):
        if self.qkv_proj is not None:
            kv = self.n_kv_heads * self.head_dim
            return _project_fused(self.qkv_proj, ("q_proj", "k_proj", "v_proj"),
                                  [self.n_heads * self.head_dim, kv, kv], x, lora)
        return tuple(_project(getattr(self, n), n, x, lora) for n in ("q_proj", "k_proj", "v_proj"))

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lora=None):
        """Project and rotate: q [B,H,T,hd], k/v [B,Hkv,T,hd] for the new tokens."""
        B, T, _ = x.shape
        if self.qkv_proj is not None and lora is None:   # q and k rotated together: one rope, not two
            flat = self.qkv_proj(x)
            qkv = flat.view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim).transpose(1, 2)
            if kernels.supports_rope(flat, cos, self.head_dim):
                qk = kernels.rope_qk(flat, cos, sin, self.n_heads + self.n_kv_heads, self.head_dim)
            else:
                qk = apply_rope(qkv[:, :self.n_heads + self.n_kv_heads], cos, sin)
            return qk[:, :self.n_heads], qk[:, self.n_heads:], qkv[:, self.n_heads + self.n_kv_heads:]
        q, k, v = self._projections(x, lora)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lora=None) -> torch.Tensor:
        """Queries only, q [B,H,T,hd] (shared-KV stages compute no K/V of their own; once fused,
        the one q/k/v matmul runs and k/v are dropped)."""
        B, T, _ = x.shape
        q = (self._projections(x, lora)[0] if self.qkv_proj is not None else _project(self.q_proj, "q_proj", x, lora))
        return apply_rope(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)

    def output(self, attn: torch.Tensor, lora=None) -> torch.Tensor:
        """attn [B,H,T,hd] -> [B,T,D]."""
        B, _, T, _ = attn.shape
        return _project(self.o_proj, "o_proj", attn.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim), lora)

    def forward(self, x, cos, sin, past_kv=None, mask=None, lora=None, attend=None, skip_kv=False):
        """Attend the new tokens to past_kv + themselves.

        mask: optional bool [B or 1, 1, T, S+T] (True = attend); default is causal.
        attend: optional `attend(q, k, v) -> [B, H, T, hd]` replacing the whole attention over
        past_kv (the engine passes one that writes k/v into its paged cache and reads it back).
        skip_kv: compute queries only and call attend(q, None, None) (it supplies K/V computed
        elsewhere: MoR recursive KV sharing); returns (output, None).
        Returns (output [B,T,D], (k, v)) where k, v hold only the new tokens.
        """
        if skip_kv:
            return self.output(attend(self.query(x, cos, sin, lora), None, None), lora), None
        q, k, v = self.qkv(x, cos, sin, lora)
        if attend is not None:
            return self.output(attend(q, k, v), lora), (k, v)
        keys, values = k, v
        if past_kv is not None:
            keys = torch.cat((past_kv[0], k), dim=2)
            values = torch.cat((past_kv[1], v), dim=2)
        T, S = q.shape[2], keys.shape[2]
        if mask is None and T > 1:
            mask = None if S == T else causal_mask(T, S, x.device)
            is_causal = S == T
        else:
            is_causal = False
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.output(out, lora), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.gate_up_proj = None  # set by fuse()

    def fuse(self) -> None:
        """Inference transform: gate/up become one matmul (`gate_up_proj`); the separate weights go."""
        if self.gate_up_proj is None:
            self.gate_up_proj = _fused_linear(self.gate_proj, self.up_proj)
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        if self.gate_up_proj is not None:
            ffn = self.gate_up_proj.out_features // 2
            if lora is None and kernels.supports_elementwise(x, ffn):
                return self.down_proj(kernels.silu_mul(self.gate_up_proj(x)))
            gate, up = _project_fused(self.gate_up_proj, ("gate_proj", "up_proj"), [ffn, ffn], x, lora)
        else:
            gate, up = _project(self.gate_proj, "gate_proj", x, lora), _project(self.up_proj, "up_proj", x, lora)
        return _project(self.down_proj, "down_proj", F.silu(gate) * up, lora)


class Block(nn.Module):
    """One pre-norm transformer layer; the weights of one engine *stage*."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def fuse(self) -> None:
        """Fused q/k/v and gate/up matmuls for inference (see Attention.fuse, MLP.fuse)."""
        self.attn.fuse()
        self.mlp.fuse()

    def forward(self, x, cos, sin, past_kv=None, mask=None, lora=None, attend=None, skip_kv=False):
        a, kv = self.attn(self.attn_norm(x), cos, sin, past_kv=past_kv, mask=mask, lora=lora, attend=attend,
                          skip_kv=skip_kv)
        x = x + a
        return x + self.mlp(self.mlp_norm(x), lora), kv
