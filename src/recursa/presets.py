"""Named model shapes: `tiny` for tests, `small` for the CPU demo, the SmolLM and Mixture-of-Recursions shapes.

    cfg = preset("small", vocab_size=tok.vocab_size)     # a ModelConfig, with field overrides
"""
from __future__ import annotations

from recursa.config import ConfigError, ModelConfig

PRESETS: dict[str, dict] = {
    # ~1M parameters: unit tests.
    "tiny": dict(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=320, max_seq_len=256),
    # ~13M parameters with the 8k corpus tokenizer: the CPU demo.
    "small": dict(vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024, max_seq_len=512),
    # SmolLM / Mixture-of-Recursions shapes (vocab 49152, context 2048).
    "135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, max_seq_len=2048),
    "360m": dict(vocab_size=49152, dim=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_dim=2560, max_seq_len=2048),
    "730m": dict(vocab_size=49152, dim=1536, n_layers=26, n_heads=24, n_kv_heads=8, ffn_dim=4096, max_seq_len=2048),
    "1.7b": dict(vocab_size=49152, dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, ffn_dim=8192, max_seq_len=2048),
}
# Mixture-of-Recursions (Bae et al. 2025): Middle-Cycle sharing, Nr = 3 (expert choice unless named).
# `mor-tiny` / `mor-small` are the CPU-sized shapes (8 depths: 1 + 3 loops x 2 layers + 1); the
# 135m / 360m ones keep the paper's widths; 135m uses 29 depths so that 3 divides the looped 27.
_MOR = dict(sharing="middle_cycle", n_loops=3, mor_router="expert")
PRESETS.update({
    "mor-tiny": {**PRESETS["tiny"], **_MOR, "n_layers": 8},
    "mor-tiny-token": {**PRESETS["tiny"], **_MOR, "n_layers": 8, "mor_router": "token"},
    "mor-tiny-share": {**PRESETS["tiny"], **_MOR, "n_layers": 8, "mor_kv": "share"},
    "mor-small": {**PRESETS["small"], **_MOR, "n_layers": 8},
    "mor-small-token": {**PRESETS["small"], **_MOR, "n_layers": 8, "mor_router": "token"},
    # a Recursive Transformer of `small`'s width: 2 layers looped 3 times (train with --loop-exit-weight
    # for exits at the loop ends)
    "rec-small": {**PRESETS["small"], "sharing": "cycle", "n_loops": 3},
    "mor-135m": {**PRESETS["135m"], **_MOR, "n_layers": 29},
    "mor-360m": {**PRESETS["360m"], **_MOR, "n_layers": 32},
    "mor-360m-2": {**PRESETS["360m"], **_MOR, "n_layers": 32, "n_loops": 2},
})


def preset(name: str, **overrides) -> ModelConfig:
    """A named shape, with optional field overrides (e.g. vocab_size from a tokenizer)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
