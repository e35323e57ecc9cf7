"""Parameter counts implied by a ModelConfig's shape, for the parts beyond the plain decoder
(ModelConfig.num_params adds them to the layers and embeddings)."""
from __future__ import annotations


def lora_params(cfg) -> int:
    """LoRA parameters of a relaxed model: one adapter per shared depth and projection."""
    q, kv, d, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.dim, cfg.ffn_dim
    shapes = [(cfg.lora_rank_attn, i, o) for i, o in ((d, q), (d, kv), (d, kv), (q, d))]
    shapes += [(cfg.lora_rank_mlp, i, o) for i, o in ((d, f), (d, f), (f, d))]
    per_depth = sum(min(r, i, o) * (i + o) for r, i, o in shapes)
    return cfg.n_shared_layers * cfg.n_loops * per_depth


def router_params(cfg) -> int:
    """Router parameters of a Mixture-of-Recursions model (0 otherwise)."""
    if not cfg.is_mor:
        return 0
    out, n = (1, cfg.n_loops) if cfg.mor_router == "expert" else (cfg.n_loops, 1)
    one = cfg.dim * out if cfg.mor_router_arch == "linear" else cfg.dim * cfg.dim + cfg.dim * out
    return one * n * (2 if cfg.mor_aux_router else 1)
